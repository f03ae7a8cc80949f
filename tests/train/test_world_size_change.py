"""A checkpoint written by 2 workers resumes on 1 and on 2, and one written by 1 resumes on 2: real DeepSpeed
engines (ZeRO 0, 2 and 3; LoRA and full fine-tuning; fp32 and bf16) on gloo ranks, saved and restored
through train/checkpoint.py. After the resume every trainable weight, fp32 master weight, Adam moment and
step, the learning rate and the schedule's step equal the saved ones exactly: re-partitioning copies
numbers, it computes none.

Also here: the LoRA adapter check at save time under ZeRO-3 on 2 ranks."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from tests.gloo import run_ranks
from vlmtune import runs
from vlmtune.config import Config, FreezeConfig, LoraConfig, ModelConfig, TrainConfig
from vlmtune.data.position import DataPosition
from vlmtune.errors import CheckpointError
from vlmtune.models.loading import prepare_model
from vlmtune.train.checkpoint import Resume, check_adapter, loads_universal, restore, write_checkpoint
from vlmtune.train.engine import build_engine, deepspeed_config, init_distributed

pytestmark = pytest.mark.slow

# (ZeRO stage, LoRA, bf16): every stage with LoRA and full fine-tuning; bf16 where fp32 masters differ from the
# weights the model holds
CASES = [(0, True, False), (0, False, True), (2, True, True), (2, False, False), (3, True, False), (3, False, True)]
STEPS = 3


def config(zero: int, lora: bool, bf16: bool) -> Config:
    return Config(model=ModelConfig(lora=LoraConfig(enabled=lora, targets=["language_attention"]),
                                    freeze=FreezeConfig(vision_tower=True)),
                  train=TrainConfig(zero_stage=zero, bf16=bf16, micro_batch_size=1, lr=1e-2, warmup_steps=1,
                                    max_steps=20))


def engine_for(cfg: Config, world: int, universal: bool = False):
    """As train/loop.py builds it: under ZeRO-3 the model is partitioned as it is built."""
    ds = deepspeed_config(cfg.train, world, on_gpu=False, load_universal=universal)
    init_distributed(on_gpu=False)
    model, _ = prepare_model(cfg.model, torch.bfloat16 if cfg.train.bf16 else torch.float32, seed=cfg.train.seed,
                             deepspeed_config=ds)
    return build_engine(model, cfg.train, world, on_gpu=False, config=ds)


def train_steps(engine, rank: int, first: int, count: int) -> None:
    for step in range(first, first + count):
        ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(1000 * step + rank))
        engine.backward(engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss)
        engine.step()


def flat(prefix: str, value) -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().clone()}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(f"{prefix}.{key}", item).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(f"{prefix}.{i}", item).items()}
    return {prefix: torch.tensor(float(value))} if isinstance(value, (int, float)) else {}


def engine_state(engine) -> dict[str, torch.Tensor]:
    """Collective: the whole training state of an engine, full tensors by name, on every rank."""
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
        state = {f"weight.{n}": p.detach().float().clone() for n, p in trainable}
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the AdamW inside DeepSpeed's wrapper
    if engine.zero_optimization_stage() == 0:  # not partitioned: the optimizer's own state is everything
        state.update(flat("optimizer", engine.optimizer.state_dict()))
    else:
        # ZeRO-1/2 link each parameter to its moments at the first step after a plain load; read them now
        getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
        for name, param in trainable:
            state[f"fp32.{name}"] = safe_get_full_fp32_param(param).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}.{name}"] = safe_get_full_optimizer_state(param, key).clone()
        state["adam_steps"] = torch.tensor(sorted({float(s["step"]) for s in optimizer.state.values()}))
    state["lr"] = torch.tensor([g["lr"] for g in optimizer.param_groups])
    state["schedule_step"] = torch.tensor(engine.lr_scheduler.state_dict()["last_epoch"])
    state["global_steps"] = torch.tensor(engine.global_steps)
    return state


def _save(rank: int, world: int, root: str, resume_from: str | None, cases: list[tuple]) -> dict:
    """Train (after resuming `resume_from` when given), save each case to `root/<case>`; the states saved."""
    torch.set_num_threads(1)
    saved = {}
    for case in cases:
        cfg = config(*case)
        directory = f"{root}/{'-'.join(map(str, case))}"
        resume = None
        if resume_from is not None:
            source = f"{resume_from}/{'-'.join(map(str, case))}"
            resume = Resume(source, runs.read_trainer_state(source), own_run=True)
        engine = engine_for(cfg, world, loads_universal(resume, world, cfg.train.zero_stage))
        state = restore(engine, resume, cfg, rank, world)
        train_steps(engine, rank, state.step, STEPS)
        state.step += STEPS
        state.position = DataPosition(window=(0, 10 * state.step + rank))
        write_checkpoint(engine, cfg, state, rank, world, Path(directory))
        saved[case] = engine_state(engine)
    return saved if rank == 0 else {}


def _resume(rank: int, world: int, root: str, cases: list[tuple]) -> dict:
    """Restore each case of `root` on this world size; the states loaded and the loop states."""
    torch.set_num_threads(1)
    loaded = {}
    for case in cases:
        cfg = config(*case)
        directory = f"{root}/{'-'.join(map(str, case))}"
        resume = Resume(directory, runs.read_trainer_state(directory), own_run=True)
        engine = engine_for(cfg, world, loads_universal(resume, world, cfg.train.zero_stage))
        state = restore(engine, resume, cfg, rank, world)
        loaded[case] = (engine_state(engine), state)
    return loaded


def assert_same_state(saved: dict, loaded: dict, case) -> None:
    assert saved.keys() == loaded.keys(), case
    different = [k for k in saved if saved[k].shape != loaded[k].shape or not torch.equal(saved[k], loaded[k])]
    assert not different, f"{case}: {different[:5]}"


def test_a_checkpoint_resumes_exactly_on_another_number_of_workers(tmp_path):
    two = str(tmp_path / "by-two")
    saved_by_two = run_ranks(_save, 2, two, None, CASES)[0]
    on_one, on_two = run_ranks(_resume, 1, two, CASES)[0], run_ranks(_resume, 2, two, CASES)
    for case in CASES:
        state, loop = on_one[case]
        assert_same_state(saved_by_two[case], state, case)
        assert loop.step == STEPS and loop.position is None and loop.rng is None
        assert loop.previous_positions == [DataPosition(window=(0, 10 * STEPS + r)) for r in (0, 1)]  # old-rank order
        for rank, (state, loop) in enumerate(r[case] for r in on_two):  # the same world size: as before
            assert_same_state(saved_by_two[case], state, case)
            assert loop.position == DataPosition(window=(0, 10 * STEPS + rank)) and loop.rng is not None
            assert loop.previous_positions is None

    # and back up: what one worker trained on from there resumes on two (ZeRO-0 needs no conversion either way)
    partitioned = [case for case in CASES if case[0] > 0]
    one = str(tmp_path / "by-one")
    saved_by_one = run_ranks(_save, 1, one, two, partitioned)[0]
    for loaded in run_ranks(_resume, 2, one, partitioned):
        for case in partitioned:
            state, loop = loaded[case]
            assert_same_state(saved_by_one[case], state, case)
            assert loop.step == 2 * STEPS and loop.rng is None
            assert loop.previous_positions == [DataPosition(window=(0, 20 * STEPS))]


def _check_adapter_before_and_after_a_step(rank: int, world: int) -> list[str | None]:
    torch.set_num_threads(1)
    engine = engine_for(config(3, True, False), world)
    outcomes = []
    for step in (0, 1):  # a fresh adapter (lora_B at its zero initialisation), then one trained a step
        train_steps(engine, rank, 0, step)
        try:
            check_adapter(engine.module, step, engine.device)
            outcomes.append(None)
        except CheckpointError as e:
            outcomes.append(str(e))
    return outcomes


def test_an_all_zero_lora_adapter_stops_the_save_on_every_rank_under_zero3():
    """Under ZeRO-3 a rank's `param.data` is empty between forwards: the check reads the partitions."""
    on_rank_0, on_rank_1 = run_ranks(_check_adapter_before_and_after_a_step, 2)
    assert on_rank_0 == on_rank_1
    untrained, trained = on_rank_0
    assert "the LoRA adapter to save at step 0 is all zero (lora_B)" in untrained
    assert trained is None
