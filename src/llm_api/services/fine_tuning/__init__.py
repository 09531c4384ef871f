"""Fine-tuning jobs (OpenAI's fine-tuning API): LoRA training of the local model on CPU, in the
Celery worker or the embedded dispatcher, served afterwards as `ft:...` models. See
docs/fine-tuning.md."""
