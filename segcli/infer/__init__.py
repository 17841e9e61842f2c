"""Image to mask: the inference spec a checkpoint stores, running a model over batches, tiles
and test-time augmentation, evaluation against labels, and prediction over files. Nothing here
prints or imports train/ or cli/."""
