"""Private ModelOpt internals we rely on, one named accessor each (written against 0.47.0).

They concern ``modelopt.torch.distill.DistillationModel`` (``distillation_model.py``). No
function imports ModelOpt: each takes the model it works on.
"""

from __future__ import annotations

from typing import Any


def discard_captured_outputs(model: Any, *, student: bool = True, teacher: bool = True) -> None:
    """Drop the layer outputs a ``DistillationModel``'s capture hooks stored.

    ModelOpt 0.47.0 registers forward hooks on every (student layer, teacher layer) pair of its
    private ``_layers_to_loss`` map; they store the layer's output in the layer's private
    ``_intermediate_output``, and only ``compute_kd_loss`` clears it. A forward whose outputs no
    KD loss will read (the teacher's own validation loss, the student's forward alone) must clear
    them itself: stale outputs keep activations alive, and a student layer's next captured
    forward warns about them.

    Args:
        model: the ``DistillationModel``.
        student: clear the student layers' outputs.
        teacher: clear the teacher layers' outputs.
    """
    for student_layer, teacher_layer in model._layers_to_loss:
        if student:
            student_layer._intermediate_output = None
        if teacher:
            teacher_layer._intermediate_output = None


def captured_output(layer: Any) -> Any:
    """What ModelOpt 0.47.0's capture hook last stored for ``layer`` (its private
    ``_intermediate_output``; see :func:`discard_captured_outputs`), or ``None``."""
    return getattr(layer, "_intermediate_output", None)


def replace_captured_output(layer: Any, output: Any) -> None:
    """Store ``output`` where ``compute_kd_loss`` will hand ``layer``'s captured output to its
    criterion (the private ``_intermediate_output`` of ModelOpt 0.47.0)."""
    layer._intermediate_output = output


def hidden_state_dict_prefixes() -> tuple[str, ...]:
    """State-dict key prefixes of the teacher and the loss modules inside a ``DistillationModel``.

    ModelOpt 0.47.0 registers the teacher and the criteria with parameters (projections) as the
    private submodules ``_teacher_model`` and ``_loss_modules``; its ``hide_teacher_model`` and
    ``hide_loss_modules`` remove them from a state dict. The student export checks with these
    prefixes that none of their tensors is left.

    Returns:
        The prefixes.
    """
    return ("_teacher_model", "_loss_modules")


# HF architectures ModelOpt 0.47.0's importer has no rule book for, and the one they share
# tensor names and layouts with.
HF_IMPORT_ALIASES = {"MistralForCausalLM": "LlamaForCausalLM"}


def import_hf_weights(model: Any, directory: str, dtype: Any) -> None:
    """Load an HF checkpoint's weights into a megatron ``GPTModel`` stage, in place.

    This is ``modelopt.torch.export.import_mcore_gpt_from_hf`` (ModelOpt 0.47.0, module
    ``plugins/megatron_importer.py``) with three private points touched:

    - the importer picks its rules by ``config.architectures[0]`` from the book its private
      ``_populate_rule_book`` builds; Mistral, which that book lacks, gets Llama's rules
      (:data:`HF_IMPORT_ALIASES`: the same tensor names, shapes and layouts);
    - ``disable_tqdm`` is set so the import draws no progress bars;
    - ``_import_state_dict()`` is the private method the public function calls.

    Each rank reads only its own tensor-parallel slices, tensor by tensor, with
    ``safetensors.safe_open(...).get_slice``; a pipeline stage reads only its own layers.

    Args:
        model: the local stage (a megatron ``GPTModel``).
        directory: local HF directory with safetensors weights.
        dtype: dtype the tensors are cast to on the way in (the model's ``params_dtype``).
    """
    from modelopt.torch.export.plugins.megatron_importer import GPTModelImporter

    class _Importer(GPTModelImporter):
        def _populate_rule_book(self) -> dict[str, Any]:
            book = super()._populate_rule_book()
            for alias, known in HF_IMPORT_ALIASES.items():
                book.setdefault(alias, book[known])
            return book

    importer = _Importer(model, directory, dtype=dtype)
    importer.disable_tqdm = True
    importer._import_state_dict()
