"""Stand-ins the step model (fastft.memory.step_model) swaps in where a GPU run allocates differently from the same
code on meta/CPU tensors: FlashAttention-2's memory (:mod:`.attention`), bitsandbytes' NF4 layers (:mod:`.linear4bit`),
PEFT's LoRA forward (:mod:`.lora`), gradient checkpointing with host offload (:mod:`.checkpointing`) and optimizer
states, bitsandbytes' 8-bit AdamW included (:mod:`.optim`). See step_model's docstring for what each models."""
