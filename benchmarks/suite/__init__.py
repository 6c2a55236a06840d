"""`laplace-lora bench`: our LoRA backends against laplace-torch's, one process.

Modules: `measure` (timing, peak memory, child processes with limits),
`workloads` (models and data), `contenders` (how each Laplace is built),
`suite` (the sections, tables, JSON and plots).
"""
