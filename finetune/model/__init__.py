"""The model: loading it for training, adapters, sizes, and the checks on folders that may come from someone else.

    loading       fp32 master weights, the packed-rows attention, adapters, placement or sharding
    lora          --lora / --qlora: peft adapters on a frozen (or 4-bit) base, target modules, the merge
    size          parameter counts and matmul weights read off the model on the meta device
    adapter       checks of a saved adapter folder before peft applies it (inference.py --adapter)
    weight_files  naming the weight file that cannot be read
    remote_code   nothing from a folder runs as code without --trust-remote-code
    hub           failing fast with one line when the Hugging Face Hub cannot answer
    gguf          a GGUF file made into a model folder once (`python -m finetune.model.gguf FILE FOLDER`)
"""
