"""Data: from a raw data set to prepared rows (prepare_dataset.py), and from prepared rows to packed micro-batches.

    recipes           one prompt-building function per recipe (edit these to change a prompt)
    raw_data          loading the inputs: data files, folders, hub data sets, tokenizers
    preparation       tokenising a recipe's examples, the train/validation split, the report
    conversations     rows of conversations checked and put in one form (content parts, reasoning, tool calls)
    chat              conversations in a model's own chat format, with the loss on the assistant replies
    chat_preparation  the chat recipe: conversations to training rows, its report
    mixing            several sources in given proportions (--dataset-weights)
    output            the output folder (--save-path): one writer at a time, the old one kept until the new is whole
    packing           examples into rows of the block size, each example whole, little padding
    batches           training side: load a prepared data set, plan the rows of each step, masks, labels, example spans, loaders
"""
