"""Tests for kd_module.data.datamodule.GPTDataModule on real megatron-core GPT datasets."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kd_module.data.datamodule import GPTDataModule, check_seq_length, parse_blend
from kd_module.data.prepare import prepare_data
from kd_module.data.sampler import MegatronPretrainingSampler

SEQ = 16
EOD = 256


def _prepare(directory, name, texts):
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return prepare_data(str(path), str(directory / name), workers=1)["output_prefix"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three prefixes: varied text, documents of only 'a', documents of only 'b'."""
    directory = tmp_path_factory.mktemp("data")
    varied = [f"document {i}: " + "lorem ipsum dolor " * (1 + i % 5) for i in range(300)]
    return {
        "varied": _prepare(directory, "varied", varied),
        "a": _prepare(directory, "a", ["a" * (20 + i % 7) for i in range(300)]),
        "b": _prepare(directory, "b", ["b" * (20 + i % 7) for i in range(300)]),
        "directory": directory,
    }


def _module(paths, tmp_path, **overrides):
    settings = dict(
        paths=paths,
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=8,
        split="90,10,0",
        index_mapping_dir=str(tmp_path / "cache"),
        num_train_samples=128,
        num_val_samples=16,
    )
    settings.update(overrides)
    return GPTDataModule(**settings)


def _tokens(loader, limit=None):
    batches = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        batches.append(batch["tokens"])
    return torch.cat(batches)


def test_batch_contract_shapes_dtypes_and_label_shift(data, tmp_path):
    """Micro-batches hold tokens/labels/loss_mask/position_ids [b, s]; labels are tokens shifted."""
    module = _module(data["varied"], tmp_path)
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "sample_index"}
    # sample_index names each row's dataset item: the key of an offline teacher cache.
    assert batch["sample_index"].tolist() == [0, 1]
    for row, index in enumerate(batch["sample_index"].tolist()):
        assert torch.equal(batch["tokens"][row], module.train_dataset[index]["tokens"])
    for key, dtype in [
        ("tokens", torch.int64),
        ("labels", torch.int64),
        ("position_ids", torch.int64),
    ]:
        assert batch[key].shape == (2, SEQ) and batch[key].dtype == dtype
    assert batch["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    torch.testing.assert_close(batch["position_ids"], torch.arange(SEQ).expand(2, SEQ))
    torch.testing.assert_close(batch["loss_mask"], torch.ones(2, SEQ))


def test_document_resets_follow_eod(data, tmp_path):
    """Reset options: positions restart after EOD, EOD has no loss, attention stops there."""
    module = _module(
        data["varied"],
        tmp_path,
        eod_mask_loss=True,
        reset_position_ids=True,
        reset_attention_mask=True,
    )
    batches = list(module.train_dataloader())
    with_eod = [(b, i) for b in batches for i in range(2) if (b["tokens"][i, :-1] == EOD).any()]
    assert with_eod, "the data should put an EOD inside some sample"
    batch, row = with_eod[0]
    tokens = batch["tokens"][row]
    eod = int((tokens == EOD).nonzero()[0])
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, SEQ, SEQ) and mask.dtype == torch.bool
    assert batch["position_ids"][row, eod + 1] == 0
    assert batch["loss_mask"][row, eod] == 0 and batch["loss_mask"][row, eod + 1] == 1
    assert bool(mask[row, 0, eod + 1, eod]) and not bool(mask[row, 0, eod, eod])
    assert bool(mask[row, 0, 0, 1])  # causal: a position never sees a later one


def test_same_samples_in_the_same_order_across_builds(data, tmp_path):
    """Two builds (fresh cache and reused cache) yield identical train and validation tokens."""
    first = _module(data["varied"], tmp_path)
    second = _module(data["varied"], tmp_path)
    elsewhere = _module(data["varied"], tmp_path, index_mapping_dir=str(tmp_path / "other"))
    reference = _tokens(first.train_dataloader())
    assert reference.shape == (128, SEQ)
    torch.testing.assert_close(_tokens(second.train_dataloader()), reference)
    torch.testing.assert_close(_tokens(elsewhere.train_dataloader()), reference)
    torch.testing.assert_close(_tokens(second.val_dataloader()), _tokens(first.val_dataloader()))
    assert not torch.equal(
        _tokens(_module(data["varied"], tmp_path, seed=7).train_dataloader()), reference
    )


def test_resume_from_consumed_samples_continues_the_uninterrupted_run(data, tmp_path):
    """A module resumed with state_dict at step 3 yields the uninterrupted run's micro-batches."""
    uninterrupted = _tokens(_module(data["varied"], tmp_path).train_dataloader())
    stopped = _module(data["varied"], tmp_path, consumed_samples=3 * 8)
    resumed = _module(data["varied"], tmp_path)
    resumed.load_state_dict(stopped.state_dict())
    assert resumed.state_dict()["consumed_samples"] == 24
    torch.testing.assert_close(_tokens(resumed.train_dataloader()), uninterrupted[24:])


def test_dp2_ranks_partition_each_global_batch(data, tmp_path):
    """Rank 0 and rank 1 micro-batches of step g are together the DP=1 global batch g."""
    module = _module(data["varied"], tmp_path)
    module.setup()
    reference = _tokens(module.train_dataloader())

    def rank_tokens(rank):
        sampler = MegatronPretrainingSampler(128, 8, 2, 8, rank, 2)
        return _tokens(DataLoader(module.train_dataset, batch_sampler=sampler))

    rank0, rank1 = rank_tokens(0), rank_tokens(1)
    assert len(rank0) == len(rank1) == 60
    for step in range(len(rank0) // 4):
        both = torch.cat([rank0[4 * step : 4 * step + 4], rank1[4 * step : 4 * step + 4]])
        torch.testing.assert_close(both, reference[8 * (step + 1) : 8 * (step + 2)])


def test_blend_follows_its_weights(data, tmp_path):
    """A [0.25, a, 0.75, b] blend draws samples from a and b in a 1:3 ratio (within 0.02)."""
    module = _module([0.25, data["a"], 0.75, data["b"]], tmp_path, num_train_samples=800)
    tokens = _tokens(module.train_dataloader())
    from_a = ((tokens == ord("a")).sum(dim=1) > 0).float().mean().item()
    from_b = ((tokens == ord("b")).sum(dim=1) > 0).float().mean().item()
    assert len(tokens) == 800
    assert from_a == pytest.approx(0.25, abs=0.02) and from_b == pytest.approx(0.75, abs=0.02)


class _Recorder(L.LightningModule):
    """Records the tokens of every training batch; one micro-batch per optimizer step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_index):
        self.seen.append(batch["tokens"].clone())
        return (self.weight * batch["tokens"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module, max_steps, checkpoint=None):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    recorder = _Recorder()
    trainer.fit(recorder, datamodule=module, ckpt_path=checkpoint)
    return trainer, recorder


def test_lightning_resume_from_checkpoint_continues_the_sample_sequence(data, tmp_path):
    """A Lightning run stopped at step 3 and resumed from its checkpoint sees unbroken batches."""
    settings = dict(micro_batch_size=2, global_batch_size=2, num_train_samples=64)
    _, full = _fit(_module(data["varied"], tmp_path, **settings), max_steps=6)
    trainer, first = _fit(_module(data["varied"], tmp_path, **settings), max_steps=3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, second = _fit(_module(data["varied"], tmp_path, **settings), 6, str(tmp_path / "step3.ckpt"))
    assert len(full.seen) == 6 and len(first.seen) == 3 and len(second.seen) == 3
    torch.testing.assert_close(torch.cat(first.seen + second.seen), torch.cat(full.seen))


def test_train_samples_default_to_max_steps_times_global_batch(data, tmp_path):
    """Without num_train_samples, the trainer's max_steps x global_batch_size samples are built."""
    module = _module(data["varied"], tmp_path, num_train_samples=None, global_batch_size=2)
    # _Recorder steps the optimizer once per micro-batch, so global_batch_size = micro_batch_size.
    _, recorder = _fit(module, max_steps=5)
    assert module.train_dataset.num_samples == 10 and len(recorder.seen) == 5


def test_mock_data_gives_the_same_batch_contract(tmp_path):
    """mock=True draws megatron's MockGPTDataset with the same keys and shapes."""
    module = GPTDataModule(
        mock=True, seq_length=SEQ, micro_batch_size=2, global_batch_size=4, num_train_samples=8
    )
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "sample_index"}
    assert batch["tokens"].shape == (2, SEQ)


def test_per_split_paths_use_their_own_prefixes(data, tmp_path):
    """A {'train', 'validation'} dict trains on one prefix and validates on the other."""
    module = _module({"train": data["a"], "validation": data["b"]}, tmp_path)
    train, validation = _tokens(module.train_dataloader()), _tokens(module.val_dataloader())
    assert set(train.unique().tolist()) == {ord("a"), EOD}
    assert set(validation.unique().tolist()) == {ord("b"), EOD}
    assert len(validation) == 16


def test_missing_prefix_is_named_before_any_index_is_built(data, tmp_path):
    """A prefix without .bin/.idx is named, and no index mapping is written for the others."""
    missing = str(tmp_path / "nowhere" / "corpus")
    module = _module([1.0, data["a"], 1.0, missing], tmp_path)
    with pytest.raises(
        ValueError, match=r"no megatron dataset \(.bin and .idx\) at prefix '.*nowhere/corpus'"
    ):
        module.setup()
    assert not (tmp_path / "cache").exists()


def test_split_without_documents_is_refused_before_megatron_loops(data, tmp_path):
    """'969,30,1' over 300 documents leaves the test split empty; that is named, not hung on."""
    module = _module(data["a"], tmp_path, split="969,30,1")
    with pytest.raises(ValueError, match=r"leaves no document in the test split of '.*/a' \(300"):
        module.setup()


def test_seq_length_longer_than_position_embeddings_is_refused():
    """seq_length above max_position_embeddings names both numbers; equal is accepted."""
    check_seq_length(2048, 2048)
    with pytest.raises(
        ValueError, match=r"seq_length=4096 is larger than the model's max_position_embeddings=2048"
    ):
        check_seq_length(4096, 2048)


def test_bad_config_values_are_all_named(tmp_path):
    """Every bad argument is reported in one error with its value."""
    with pytest.raises(ValueError) as error:
        GPTDataModule(paths={"trian": "x"}, micro_batch_size=3, global_batch_size=8, split="a,b")
    message = str(error.value)
    assert "unknown split 'trian' (did you mean 'train'?)" in message
    assert "global_batch_size=8 must be a multiple of micro_batch_size=3" in message
    assert "split='a,b'" in message
    with pytest.raises(ValueError, match="paths is None; give dataset prefixes or set mock=True"):
        GPTDataModule()


def test_train_samples_need_a_number_or_a_trainer(data, tmp_path):
    """Without num_train_samples and without a trainer the module says what to set."""
    with pytest.raises(ValueError, match="set num_train_samples or trainer.max_steps"):
        _module(data["varied"], tmp_path, num_train_samples=None).setup()


def test_parse_blend_reads_prefixes_and_weights():
    """One prefix, a plain list and an alternating weighted list parse to megatron's blend."""
    assert parse_blend("p") == (["p"], None)
    assert parse_blend(["p", "q"]) == (["p", "q"], None)
    assert parse_blend([1, "p", "3", "q"]) == (["p", "q"], [1.0, 3.0])
    with pytest.raises(ValueError, match="mixes weights and prefixes"):
        parse_blend([1, "p", "q"])


def read_shares_on_each_rank(paths, cache_dir):
    """Rank function: train tokens at DP=2 (TP=1), then at TP=2 (DP=1), from megatron's groups."""
    from kd_module.data.datamodule import data_parallel_rank_and_size
    from kd_module.parallel.runtime import initialize_distributed

    result = {}
    for tensor_parallel in (1, 2):
        initialize_distributed(tensor_model_parallel_size=tensor_parallel)
        module = _module(paths, Path(cache_dir), num_train_samples=64)
        result[tensor_parallel] = (
            data_parallel_rank_and_size(),
            _tokens(module.train_dataloader()),
        )
    return result


@pytest.mark.multirank
def test_data_parallel_ranks_read_their_share_of_a_blend(data, tmp_path):
    """Under torchrun, DP=2 ranks split each global batch of a blend and TP=2 ranks share it."""
    from tests.helpers import run_distributed

    paths = [1.0, data["varied"], 1.0, data["a"]]
    reference = _tokens(_module(paths, tmp_path, num_train_samples=64).train_dataloader())
    assert reference.shape == (64, SEQ)
    results = run_distributed(
        read_shares_on_each_rank, 2, paths, str(tmp_path / "ranks"), timeout=240
    )
    for rank, result in enumerate(results):
        (dp_rank_and_size, dp_tokens), (tp_rank_and_size, tp_tokens) = result[1], result[2]
        assert dp_rank_and_size == (rank, 2) and tp_rank_and_size == (0, 1)
        expected = torch.cat([reference[g * 8 + rank * 4 : g * 8 + rank * 4 + 4] for g in range(8)])
        torch.testing.assert_close(dp_tokens, expected)
        torch.testing.assert_close(tp_tokens, reference)
    assert any((tmp_path / "ranks").iterdir()), (
        "the blend's indices are cached in index_mapping_dir"
    )


def test_loss_mask_does_not_depend_on_which_sample_a_process_reads_first():
    """megatron-core 0.16.1 caches the first sample's loss mask after zeroing it at that sample's
    pad labels; GPTDataModule turns that cache off, so a sample's mask is its own on every rank."""

    def fresh():
        module = GPTDataModule(
            mock=True,
            seq_length=SEQ,
            micro_batch_size=2,
            global_batch_size=2,
            num_train_samples=32,
        )
        module.setup("fit")
        return module.train_dataset

    dataset = fresh()
    masks = [dataset[i]["loss_mask"] for i in range(32)]  # mock tokens include <pad> labels
    first = next(i for i in range(32) if masks[i].min() == 0)
    other = next(i for i in range(32) if masks[i].min() == 1)
    reader = fresh()
    reader[first]  # read first: megatron would cache its mask with its pad positions zeroed
    assert torch.equal(reader[other]["loss_mask"], torch.ones(SEQ))  # its own: no pad labels
    assert torch.equal(reader[first]["loss_mask"], masks[first])
