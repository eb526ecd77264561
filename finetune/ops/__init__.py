"""Kernels of the training step that packed rows need.

    example_spans     the packed micro-batch's layout: span lists and, built once by the collator, their tensors
    span_attention    "packed_spans": causal attention inside each example's span, one call per span (CPU default)
    varlen_attention  "varlen_spans" / "flex_spans": one kernel per layer over the whole micro-batch (GPU)
    chunked_loss      the causal-LM loss a chunk of tokens at a time, so full logits never exist
    router_loss       a mixture of experts' load-balancing loss over the real tokens of packed rows
"""
