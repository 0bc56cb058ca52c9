"""Lightning pieces: the modules (:mod:`.module`), ``MegatronStrategy`` (:mod:`.strategy`) and
megatron's distributed optimizer (:mod:`.optim`)."""
