"""The network: the Flax NNX decoder (:mod:`.transformer`) and MoE routing and dispatch (:mod:`.routing`)."""
