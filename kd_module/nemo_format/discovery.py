"""Finding a checkpoint's ``model_config.yaml``: next to the weights, one level up, or inside a
``.nemo`` archive; :func:`load_teacher_model_config` reads what it finds."""

from __future__ import annotations

import logging
import os
import tarfile
from typing import Any

from kd_module.hf.config import (
    CONFIG_FILE,
    gpt_config_from_hf,
    read_hf_config,
    tokenizer_section,
)
from kd_module.hf.weights import is_hf_checkpoint
from kd_module.models.gpt import GPTModelConfig
from kd_module.nemo_format.keys import MODEL_CONFIG_FILE, NEMO2_MODEL_CONFIG_FILE
from kd_module.nemo_format.reader import TeacherModelConfig, convert_nemo_model_config
from kd_module.yaml_files import parse_yaml, read_yaml

logger = logging.getLogger("kd_module.nemo_format")


def load_teacher_model_config(
    path: str | os.PathLike[str] | None,
    student: GPTModelConfig,
    teacher_checkpoint: str | os.PathLike[str] | None = None,
) -> TeacherModelConfig:
    """Find, read and convert the teacher's model config.

    The file is ``path`` when given; otherwise ``model_config.yaml`` at the root of the teacher
    checkpoint (a directory, or a NeMo 1 ``.nemo`` archive), or a NeMo 2 checkpoint's
    ``context/model.yaml``, or a Hugging Face directory's ``config.json`` (see
    :func:`hf_teacher_model_config`); otherwise the teacher reuses the student's architecture,
    which is logged (right for self-distillation and quantization-aware distillation).

    Args:
        path: explicit config file (Megatron-LM's ``--export-kd-teacher-model-config``).
        student: the student's architecture, overridden by the file.
        teacher_checkpoint: the teacher checkpoint directory or ``.nemo`` file.

    Returns:
        The teacher's architecture, precision and tokenizer section.

    Raises:
        FileNotFoundError: when ``path`` is given and does not exist.
        ValueError: when the file does not parse or a key or value is wrong.

    Examples:
        In YAML (recipe): ``teacher_model_config: /ckpt/llama31_8b/model_config.yaml``.

        In Python::

            teacher = load_teacher_model_config(None, student, teacher_checkpoint="/ckpt/8b")
            model = build_model(teacher.model, layout)
    """
    if path is not None:
        path = os.fspath(path)
        return convert_nemo_model_config(_read_yaml(path), student, source=path)
    if teacher_checkpoint is not None:
        checkpoint = os.fspath(teacher_checkpoint)
        if os.path.isfile(checkpoint) and tarfile.is_tarfile(checkpoint):
            data = _read_from_nemo_archive(checkpoint)
            if data is not None:
                source = f"{checkpoint}:{MODEL_CONFIG_FILE}"
                return convert_nemo_model_config(data, student, source=source)
        for name in (MODEL_CONFIG_FILE, NEMO2_MODEL_CONFIG_FILE):
            candidate = os.path.join(checkpoint, name)
            if os.path.isfile(candidate):
                return convert_nemo_model_config(_read_yaml(candidate), student, source=candidate)
        if is_hf_checkpoint(checkpoint):
            return hf_teacher_model_config(checkpoint, student.seq_length)
    where = (
        f" and none found in {os.fspath(teacher_checkpoint)}"
        if teacher_checkpoint is not None
        else ""
    )
    logger.warning(
        "teacher model config: no file given%s; the teacher reuses the student's architecture",
        where,
    )
    return TeacherModelConfig(model=student)


def _read_yaml(path: str) -> dict[str, Any]:
    """Parse a teacher config file; errors name the file and, for syntax errors, the line."""
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"teacher model config {path}: is a directory; pass the YAML file, or the checkpoint "
            f"directory as teacher_checkpoint to read its {MODEL_CONFIG_FILE}"
        )
    data = read_yaml(path, "teacher model config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"teacher model config {path}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    return data


def _read_from_nemo_archive(path: str) -> dict[str, Any] | None:
    """``model_config.yaml`` from a NeMo 1 ``.nemo`` tar archive, or None if it has none."""
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if os.path.basename(member.name) == MODEL_CONFIG_FILE and member.isfile():
                handle = archive.extractfile(member)
                if handle is None:
                    return None
                data = parse_yaml(handle, f"teacher model config {path}:{member.name}")
                return data if data is not None else {}
    return None


def hf_teacher_model_config(
    directory: str | os.PathLike[str], seq_length: int
) -> TeacherModelConfig:
    """The architecture, precision and tokenizer of a Hugging Face model directory.

    The architecture is ``config.json``'s (:func:`kd_module.hf.config.gpt_config_from_hf`) at the
    run's ``seq_length``; the tokenizer section names the HF tokenizer in the same directory
    when it has one, so that a data module with another tokenizer is refused.
    """
    directory = os.fspath(directory)
    hf = read_hf_config(directory)
    source = os.path.join(directory, CONFIG_FILE)
    return TeacherModelConfig(
        model=gpt_config_from_hf(hf, seq_length, source=source),
        precision=hf.get("torch_dtype") or hf.get("dtype"),
        tokenizer=tokenizer_section(directory),
        source=source,
    )
