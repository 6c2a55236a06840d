"""Commands on users' own adapters and files: finetune, fit, predict, evaluate."""
