"""Offline distillation: the teacher cache's on-disk format (:mod:`.format`), its writer
(:mod:`.writer`) and reader (:mod:`.reader`), the job that writes a cache (:mod:`.job`), the top-k
loss (:mod:`.loss`), that loss as a training objective (:mod:`.objective`) and the Lightning
module that trains from a cache (:mod:`.module`)."""
