"""Every Hugging Face convention in one place: config import/export and weight export (:mod:`.export`)."""
