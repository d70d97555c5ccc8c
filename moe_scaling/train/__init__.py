"""Training one model: corpora and token streams (:mod:`.data`), the optimiser, step and loop (:mod:`.loop`)."""
