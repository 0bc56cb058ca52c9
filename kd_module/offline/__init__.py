"""Offline distillation: the teacher cache's format, writer and reader, the top-k loss
(:mod:`.cache`), the job that writes a cache (:mod:`.job`) and the Lightning module that trains
from one (:mod:`.module`)."""
