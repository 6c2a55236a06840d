"""``python -m laplace_lora_backend`` runs the ``laplace-lora`` command line."""

from laplace_lora_cli import main

main()
