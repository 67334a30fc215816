"""Table-driven bad input over every public entry point: the right exception, a message that
names the argument, raised before any work.

"Before any work" is checked with tripwires: every compute function behind the entry points
(the blockwise and Triton backends, the oracle, the fused row path, the per-pair losses, the
model's backbone and forward, the precompute body) is replaced by one that fails the test if it
is reached. A bad option that is only noticed after the fused forward (issue 10, defect 1)
reaches a tripwire and fails its case.
"""
import math

import pytest
import torch

import dpo_fast
from dpo_fast import losses, reference
from dpo_fast.cache import RefLogpsCache, build_fingerprint
from dpo_fast.trainer import StandardTrainer, TrainerConfig

NAN, INF = float("nan"), float("inf")
B, T, H, V = 2, 5, 8, 24


class WorkReached(AssertionError):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Replace every compute function behind the public entry points by one that fails if reached."""
    calls = []

    def wire(owner, name):
        def tripped(*args, **kwargs):
            calls.append(name)
            raise WorkReached(f"{name} was reached: the bad input was not caught before the work")
        monkeypatch.setattr(owner, name, tripped)

    from dpo_fast import blockwise, ops, precompute
    from dpo_fast.integrations import hf

    for fn in ("linear_logprobs_fwd", "logits_logprobs_fwd"):
        wire(blockwise, fn)
    for fn in ("reference_linear_logprobs", "reference_logits_logprobs", "reference_logits", "_sig", "_logsig"):
        wire(reference, fn)
    wire(ops, "fused_rows_logprobs")
    wire(losses, "fused_rows_logprobs")
    wire(losses, "_per_pair_loss")
    wire(hf, "backbone_hidden_states")
    wire(precompute, "_precompute")
    try:
        from dpo_fast import kernels

        for fn in ("linear_logprobs_fwd", "logits_logprobs_fwd"):
            if hasattr(kernels, fn):
                wire(kernels, fn)
    except ImportError:  # pragma: no cover - triton missing
        pass
    return calls


def _lin():
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
                labels=torch.randint(0, V, (B, T), generator=g))


def _pair():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, generator=g, dtype=torch.float64) - 5 for _ in range(4)]


def _fused():
    g = torch.Generator().manual_seed(2)
    return dict(chosen_hidden=torch.randn(B, T, H, generator=g), chosen_labels=torch.randint(0, V, (B, T), generator=g),
                rejected_hidden=torch.randn(B, T + 1, H, generator=g),
                rejected_labels=torch.randint(0, V, (B, T + 1), generator=g), weight=torch.randn(V, H, generator=g),
                ref_chosen_logps=torch.randn(B, generator=g), ref_rejected_logps=torch.randn(B, generator=g))


class _TinyLM(torch.nn.Module):
    """Quacks like a transformers causal LM; forward and backbone are tripwired by the fixture."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
        self.model = torch.nn.Embedding(V, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise WorkReached("model forward was reached: the bad input was not caught before the work")


def _batch():
    ids = torch.randint(0, V, (B, T))
    return dict(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.long),
                completion_mask=torch.ones(B, T, dtype=torch.long))


# --------------------------------------------------------------------- callers

def call_linear(**bad):
    kw = dict(_lin(), impl="torch")
    kw.update(bad)
    return dpo_fast.linear_logprobs(**kw)


def call_vocab_parallel(**bad):
    """This rank's rows [8, 20) of a V-row head (no process group here: bad input must be named first)."""
    lin = _lin()
    kw = dict(hidden=lin["hidden"], weight_shard=lin["weight"][8:20], labels=lin["labels"], vocab_start=8,
              vocab_size=V, impl="torch")
    kw.update(bad)
    return dpo_fast.vocab_parallel_linear_logprobs(kw.pop("hidden"), kw.pop("weight_shard"), kw.pop("labels"), **kw)


def call_vocab_parallel_module(**bad):
    lin = _lin()
    options = {k: bad.pop(k) for k in list(bad) if k not in ("hidden", "weight", "labels", "bias")}
    head = dpo_fast.VocabParallelLinearLogprobs(**{"vocab_start": 8, "vocab_size": V, "impl": "torch", **options})
    return head(**{"hidden": lin["hidden"], "weight": lin["weight"][8:20], "labels": lin["labels"], **bad})


def call_logits(**bad):
    g = torch.Generator().manual_seed(3)
    kw = dict(logits=torch.randn(B, T, V, generator=g), labels=torch.randint(0, V, (B, T), generator=g), impl="torch")
    kw.update(bad)
    return dpo_fast.logits_logprobs(**kw)


def call_sequence(**bad):
    kw = dict(token_logps=torch.randn(B, T), mask=torch.ones(B, T))
    kw.update(bad)
    return dpo_fast.sequence_logps(**kw)


def call_module(**bad):
    ctor = {"impl": "torch", **{k: v for k, v in bad.items() if k not in _lin()}}
    fwd = {k: v for k, v in bad.items() if k in _lin()}
    module = dpo_fast.LinearLogprobs(**ctor)
    kw = dict(_lin(), **fwd)
    return module(kw["hidden"], kw["weight"], kw["labels"])


def call_dpo(**bad):
    pc, pr, rc, rr = _pair()
    kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    kw.update(bad)
    return dpo_fast.dpo_loss(**kw)


def call_reference_dpo(**bad):
    pc, pr, rc, rr = _pair()
    kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
              chosen_lengths=torch.full((B,), 3.0, dtype=torch.float64),
              rejected_lengths=torch.full((B,), 4.0, dtype=torch.float64))
    kw.update(bad)
    return reference.reference_dpo_loss(**kw)


def call_fused(**bad):
    kw = dict(_fused(), impl="torch")
    kw.update(bad)
    return dpo_fast.fused_linear_dpo_loss(**kw)


_TENSOR_ARGS = set(_fused())


def call_fused_module_init(**bad):
    return dpo_fast.FusedLinearDPOLoss(**bad)


def call_fused_module_forward(**bad):
    module = dpo_fast.FusedLinearDPOLoss(impl="torch")
    kw = dict(_fused(), **bad)
    return module(**kw)


def call_completion(**bad):
    from dpo_fast.integrations.hf import completion_logps

    kw = dict(_batch(), impl="torch")
    kw.update(bad)
    model = kw.pop("model", None) or _TinyLM()
    return completion_logps(model, **kw)


def call_seq_from_model(**bad):
    from dpo_fast.integrations.hf import sequence_logps_from_model

    kw = dict(_batch(), impl="torch")
    kw.update(bad)
    return sequence_logps_from_model(_TinyLM(), **kw)


def call_config(**bad):
    return TrainerConfig(**bad)


def call_trainer(**bad):
    from dpo_fast.data import PreferenceExample

    examples = [PreferenceExample((1, 2), (3, 4), (5, 6)), PreferenceExample((1, 3), (4, 4), (5, 7))]
    kw = dict(model=_TinyLM(), examples=examples, config=TrainerConfig(batch_size=1), pad_token_id=0)
    steps = bad.pop("steps", None)
    kw.update(bad)
    if steps is not None:  # train(steps): needs a trainer first, whose reference pass is the tripwire: skip it
        trainer = StandardTrainer.__new__(StandardTrainer)
        return StandardTrainer.train(trainer, steps)
    return StandardTrainer(kw.pop("model"), kw.pop("examples"), kw.pop("config"), **kw)


def call_cache_open(tmp, **bad):
    kw = dict(path=str(tmp / "absent.sqlite"))
    kw.update(bad)
    return RefLogpsCache.open(kw.pop("path"), **kw)


def _fp():
    return build_fingerprint(model_weights={"w": "0" * 64}, model_config="0" * 64, tokenizer=None, max_length=None,
                             truncation_mode="keep_start", dtype="float32", temperature=1.0, logit_scale=1.0,
                             softcap=None, ld_alpha=None)


def call_cache_create(tmp, **bad):
    kw = dict(path=str(tmp / "new.sqlite"), fingerprint=_fp())
    kw.update(bad)
    return RefLogpsCache.create_or_open(kw.pop("path"), kw.pop("fingerprint"))


def call_fingerprint(**bad):
    kw = dict(model_weights={"w": "0" * 64}, model_config="0" * 64, tokenizer=None, max_length=None,
              truncation_mode="keep_start", dtype="float32", temperature=1.0, logit_scale=1.0, softcap=None,
              ld_alpha=None)
    kw.update(bad)
    return build_fingerprint(**kw)


def call_precompute(tmp, **bad):
    from dpo_fast.precompute import precompute

    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    kw = dict(model=str(folder), dataset=[{"prompt": "a", "chosen": "b", "rejected": "c"}],
              cache=str(tmp / "ref.sqlite"), progress=False, device="cpu")
    kw.update(bad)
    return precompute(kw.pop("model"), kw.pop("dataset"), kw.pop("cache"), **kw)


def call_dataset_with_ref(tmp, **bad):
    from dpo_fast.cache import dataset_with_ref_logps

    path = str(tmp / "ds.sqlite")
    RefLogpsCache.create_or_open(path, _fp()).close()
    datasets = pytest.importorskip("datasets")
    return dataset_with_ref_logps(datasets.Dataset.from_list([{"text": "x"}]), path, **bad)


def call_fused_head(**bad):
    trl_integration = pytest.importorskip("dpo_fast.integrations.trl", exc_type=ImportError)
    return trl_integration.add_fused_lm_head(_TinyLM(), **bad)


def call_patch(**bad):
    trl_integration = pytest.importorskip("dpo_fast.integrations.trl", exc_type=ImportError)
    return trl_integration.patch(**bad)


META = torch.device("meta")

# (entry point, caller, bad arguments, exception type, text the message must contain)
CASES = [
    # linear_logprobs
    # vocabulary-parallel head (checked locally before the process group is needed)
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(temperature=NAN), ValueError, "temperature"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(softcap=-1.0), ValueError, "softcap"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(outputs=("bad",)), ValueError, "outputs"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(impl="x"), ValueError, "impl"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(impl="reference"), ValueError, "impl"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(vocab_start=-1), ValueError, "vocab_start"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(vocab_start=None), ValueError, "vocab_start"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(vocab_size=0), ValueError, "vocab_size"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(vocab_size=15), ValueError, "vocab_size"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(vocab_start=2.0), TypeError, "start"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(labels=torch.full((B, T), V)), ValueError, "labels"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(labels=torch.zeros(B, T)), TypeError, "labels"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(labels=torch.zeros(B, T + 1, dtype=torch.long)),
     ValueError, "labels"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(weight_shard=torch.randn(12)), ValueError, "weight"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(weight_shard=torch.randn(12, H + 1)), ValueError,
     "weight"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(hidden=torch.randn(B, T, H).double()), TypeError,
     "dtypes"),
    ("vocab_parallel_linear_logprobs", call_vocab_parallel, dict(bias=torch.randn(13)), ValueError, "bias"),
    ("VocabParallelLinearLogprobs", call_vocab_parallel_module, dict(temperature=-1.0), ValueError, "temperature"),
    ("VocabParallelLinearLogprobs", call_vocab_parallel_module, dict(vocab_start=V + 1), ValueError, "vocab_start"),
    ("VocabParallelLinearLogprobs", call_vocab_parallel_module, dict(labels=torch.full((B, T), -5)), ValueError,
     "labels"),
    ("linear_logprobs", call_linear, dict(temperature=NAN), ValueError, "temperature"),
    ("linear_logprobs", call_linear, dict(temperature=0.0), ValueError, "temperature"),
    ("linear_logprobs", call_linear, dict(logit_scale=INF), ValueError, "logit_scale"),
    ("linear_logprobs", call_linear, dict(softcap=NAN), ValueError, "softcap"),
    ("linear_logprobs", call_linear, dict(softcap=-1.0), ValueError, "softcap"),
    ("linear_logprobs", call_linear, dict(ignore_index=1.5), TypeError, "ignore_index"),
    ("linear_logprobs", call_linear, dict(ignore_index=True), TypeError, "ignore_index"),
    ("linear_logprobs", call_linear, dict(deterministic="yes"), TypeError, "deterministic"),
    ("linear_logprobs", call_linear, dict(outputs=("log_probs", "entropyy")), ValueError, "outputs"),
    ("linear_logprobs", call_linear, dict(outputs=()), ValueError, "outputs"),
    ("linear_logprobs", call_linear, dict(impl="cuda"), ValueError, "impl"),
    ("linear_logprobs", call_linear, dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
    ("linear_logprobs", call_linear, dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight"),
    ("linear_logprobs", call_linear, dict(labels=torch.rand(B, T)), TypeError, "labels"),
    ("linear_logprobs", call_linear, dict(labels=torch.full((B, T), V)), ValueError, "labels"),
    ("linear_logprobs", call_linear, dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "labels"),
    ("linear_logprobs", call_linear, dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    ("linear_logprobs", call_linear, dict(hidden=torch.ones(B, T, H, dtype=torch.long)), TypeError, "hidden"),
    ("linear_logprobs", call_linear, dict(weight=torch.randn(V, H, device=META)), ValueError, "weight"),
    # logits_logprobs
    ("logits_logprobs", call_logits, dict(temperature=NAN), ValueError, "temperature"),
    ("logits_logprobs", call_logits, dict(temperature=-2.0), ValueError, "temperature"),
    ("logits_logprobs", call_logits, dict(impl="fast"), ValueError, "impl"),
    ("logits_logprobs", call_logits, dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "labels"),
    ("logits_logprobs", call_logits, dict(labels=torch.full((B, T), -7)), ValueError, "labels"),
    ("logits_logprobs", call_logits, dict(logits=torch.ones(B, T, V, dtype=torch.long)), TypeError, "logits"),
    ("logits_logprobs", call_logits, dict(ignore_index="x"), TypeError, "ignore_index"),
    # sequence_logps
    ("sequence_logps", call_sequence, dict(mask=torch.ones(B, T + 1)), ValueError, "mask"),
    ("sequence_logps", call_sequence, dict(token_logps=torch.ones(B, T, dtype=torch.long)), TypeError, "token_logps"),
    ("sequence_logps", call_sequence, dict(average="yes"), TypeError, "average"),
    ("sequence_logps", call_sequence, dict(average=True, mask=torch.zeros(B, T)), ValueError, "sequence"),
    # LinearLogprobs
    ("LinearLogprobs", call_module, dict(temperature=NAN), ValueError, "temperature"),
    ("LinearLogprobs", call_module, dict(outputs=("nope",)), ValueError, "outputs"),
    ("LinearLogprobs", call_module, dict(impl="gpu"), ValueError, "impl"),
    ("LinearLogprobs", call_module, dict(softcap=0.0), ValueError, "softcap"),
    ("LinearLogprobs", call_module, dict(labels=torch.full((B, T), V + 3)), ValueError, "labels"),
    # dpo_loss: every option, NaN and range
    ("dpo_loss", call_dpo, dict(beta=NAN), ValueError, "beta"),
    ("dpo_loss", call_dpo, dict(beta=-0.1), ValueError, "beta"),
    ("dpo_loss", call_dpo, dict(beta=INF), ValueError, "beta"),
    ("dpo_loss", call_dpo, dict(beta="0.1"), TypeError, "beta"),
    ("dpo_loss", call_dpo, dict(label_smoothing=NAN), ValueError, "label_smoothing"),
    ("dpo_loss", call_dpo, dict(label_smoothing=0.7), ValueError, "label_smoothing"),
    ("dpo_loss", call_dpo, dict(label_smoothing=-0.1, loss_type="hinge"), ValueError, "label_smoothing"),
    ("dpo_loss", call_dpo, dict(loss_type="exo_pair", label_smoothing=0.0), ValueError, "label_smoothing"),
    ("dpo_loss", call_dpo, dict(loss_weights=[NAN]), ValueError, "loss_weights"),
    ("dpo_loss", call_dpo, dict(loss_weights=[INF]), ValueError, "loss_weights"),
    ("dpo_loss", call_dpo, dict(loss_weights=[-1.0]), ValueError, "loss_weights"),
    ("dpo_loss", call_dpo, dict(loss_weights=[1.0, 1.0]), ValueError, "loss_weights"),
    ("dpo_loss", call_dpo, dict(loss_weights=0.5), TypeError, "loss_weights"),
    ("dpo_loss", call_dpo, dict(loss_type=None), TypeError, "loss_type"),
    ("dpo_loss", call_dpo, dict(loss_type=3), TypeError, "loss_type"),
    ("dpo_loss", call_dpo, dict(loss_type=[]), ValueError, "loss_type"),
    ("dpo_loss", call_dpo, dict(loss_type="dpo"), ValueError, "loss_type"),
    ("dpo_loss", call_dpo, dict(loss_type=["sigmoid", None]), TypeError, "loss_type"),
    ("dpo_loss", call_dpo, dict(loss_type=["simpo", "sigmoid"]), ValueError, "simpo"),
    ("dpo_loss", call_dpo, dict(loss_type="simpo"), ValueError, "ref_chosen_logps"),
    ("dpo_loss", call_dpo, dict(simpo_gamma=NAN, ref_chosen_logps=None, ref_rejected_logps=None), ValueError,
     "simpo_gamma"),
    ("dpo_loss", call_dpo, dict(discopop_tau=NAN), ValueError, "discopop_tau"),
    ("dpo_loss", call_dpo, dict(discopop_tau=0.0, loss_type="discopop"), ValueError, "discopop_tau"),
    ("dpo_loss", call_dpo, dict(ref_chosen_logps=torch.zeros(B + 1)), ValueError, "ref_chosen_logps"),
    ("dpo_loss", call_dpo, dict(ref_rejected_logps=None), ValueError, "ref_chosen_logps"),
    ("dpo_loss", call_dpo, dict(ref_chosen_logps=torch.zeros(B, dtype=torch.long)), TypeError, "ref_chosen_logps"),
    ("dpo_loss", call_dpo, dict(ref_chosen_logps=torch.zeros(B, device=META)), ValueError, "ref_chosen_logps"),
    ("dpo_loss", call_dpo, dict(policy_rejected_logps=torch.zeros(B + 1)), ValueError, "policy_rejected_logps"),
    ("dpo_loss", call_dpo, dict(loss_type="ipo"), ValueError, "chosen_lengths"),
    ("dpo_loss", call_dpo, dict(loss_type="sft", chosen_lengths=torch.tensor([1, 0]), rejected_lengths=torch.ones(B)),
     ValueError, "chosen_lengths"),
    # reference_dpo_loss (the oracle, impl="reference"): the same check, no zip truncation
    ("reference_dpo_loss", call_reference_dpo, dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
     "loss_weights"),
    ("reference_dpo_loss", call_reference_dpo, dict(label_smoothing=NAN), ValueError, "label_smoothing"),
    ("reference_dpo_loss", call_reference_dpo, dict(loss_type=None), TypeError, "loss_type"),
    ("reference_dpo_loss", call_reference_dpo, dict(beta=-0.1), ValueError, "beta"),
    ("reference_dpo_loss", call_reference_dpo, dict(loss_type="simpo"), ValueError, "reference-free"),
    # fused_linear_dpo_loss: options and reference tensors before the fused forward
    ("fused_linear_dpo_loss", call_fused, dict(loss_type="unknown"), ValueError, "loss_type"),
    ("fused_linear_dpo_loss", call_fused, dict(loss_type=None), TypeError, "loss_type"),
    ("fused_linear_dpo_loss", call_fused, dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
     "loss_weights"),
    ("fused_linear_dpo_loss", call_fused, dict(beta=-0.1), ValueError, "beta"),
    ("fused_linear_dpo_loss", call_fused, dict(label_smoothing=0.7), ValueError, "label_smoothing"),
    ("fused_linear_dpo_loss", call_fused, dict(label_smoothing=NAN), ValueError, "label_smoothing"),
    ("fused_linear_dpo_loss", call_fused, dict(loss_type="simpo"), ValueError, "simpo"),
    ("fused_linear_dpo_loss", call_fused, dict(simpo_gamma=INF), ValueError, "simpo_gamma"),
    ("fused_linear_dpo_loss", call_fused, dict(ref_chosen_logps=torch.zeros(B + 1)), ValueError, "ref_chosen_logps"),
    ("fused_linear_dpo_loss", call_fused, dict(ref_rejected_logps=None), ValueError, "ref_rejected_logps"),
    ("fused_linear_dpo_loss", call_fused, dict(ref_chosen_logps=torch.zeros(B, device=META)), ValueError,
     "ref_chosen_logps"),
    ("fused_linear_dpo_loss", call_fused, dict(ref_rejected_logps=torch.zeros(B, dtype=torch.long)), TypeError,
     "ref_rejected_logps"),
    ("fused_linear_dpo_loss", call_fused, dict(impl="fastest"), ValueError, "impl"),
    ("fused_linear_dpo_loss", call_fused, dict(temperature=NAN), ValueError, "temperature"),
    ("fused_linear_dpo_loss", call_fused, dict(chosen_hidden=torch.randn(B + 1, T, H),
                                               chosen_labels=torch.zeros(B + 1, T, dtype=torch.long)), ValueError,
     "chosen_hidden"),
    ("fused_linear_dpo_loss", call_fused, dict(chosen_labels=torch.full((B, T), -100)), ValueError, "chosen"),
    # FusedLinearDPOLoss: at construction and at forward
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(loss_type=None), TypeError, "loss_type"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(beta=NAN), ValueError, "beta"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(label_smoothing=0.7), ValueError, "label_smoothing"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(loss_weights=[NAN]), ValueError, "loss_weights"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(simpo_gamma=NAN, loss_type="simpo"), ValueError,
     "simpo_gamma"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(impl="x"), ValueError, "impl"),
    ("FusedLinearDPOLoss()", call_fused_module_init, dict(temperature=0), ValueError, "temperature"),
    ("FusedLinearDPOLoss.forward", call_fused_module_forward, dict(ref_chosen_logps=torch.zeros(B + 1)), ValueError,
     "ref_chosen_logps"),
    ("FusedLinearDPOLoss.forward", call_fused_module_forward, dict(ref_chosen_logps=None), ValueError,
     "ref_chosen_logps"),
    ("FusedLinearDPOLoss.forward", call_fused_module_forward, dict(weight=torch.randn(V, H + 2)), ValueError, "weight"),
    # Hugging Face integration
    ("completion_logps", call_completion, dict(temperature=NAN), ValueError, "temperature"),
    ("completion_logps", call_completion, dict(outputs=("bad",)), ValueError, "outputs"),
    ("completion_logps", call_completion, dict(input_ids=torch.rand(B, T)), TypeError, "input_ids"),
    ("completion_logps", call_completion, dict(attention_mask=torch.ones(B, T + 1)), ValueError, "attention_mask"),
    ("completion_logps", call_completion, dict(completion_mask=None), ValueError, "completion_mask"),
    ("completion_logps", call_completion, dict(impl="nope"), ValueError, "impl"),
    ("sequence_logps_from_model", call_seq_from_model, dict(outputs=("entropy",)), ValueError, "outputs"),
    ("sequence_logps_from_model", call_seq_from_model, dict(temperature=-1.0), ValueError, "temperature"),
    # TrainerConfig: every field
    ("TrainerConfig", call_config, dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    ("TrainerConfig", call_config, dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    ("TrainerConfig", call_config, dict(max_grad_norm=NAN), ValueError, "max_grad_norm"),
    ("TrainerConfig", call_config, dict(learning_rate=NAN), ValueError, "learning_rate"),
    ("TrainerConfig", call_config, dict(learning_rate=0.0), ValueError, "learning_rate"),
    ("TrainerConfig", call_config, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("TrainerConfig", call_config, dict(weight_decay=NAN), ValueError, "weight_decay"),
    ("TrainerConfig", call_config, dict(adam_betas=(1.5, 0.999)), ValueError, "adam_betas"),
    ("TrainerConfig", call_config, dict(adam_betas=(0.9, 1.0)), ValueError, "adam_betas"),
    ("TrainerConfig", call_config, dict(adam_betas=(NAN, 0.9)), ValueError, "adam_betas"),
    ("TrainerConfig", call_config, dict(adam_betas=(0.9,)), ValueError, "adam_betas"),
    ("TrainerConfig", call_config, dict(adam_eps=0.0), ValueError, "adam_eps"),
    ("TrainerConfig", call_config, dict(adam_eps=NAN), ValueError, "adam_eps"),
    ("TrainerConfig", call_config, dict(batch_size=0), ValueError, "batch_size"),
    ("TrainerConfig", call_config, dict(batch_size=2.0), ValueError, "batch_size"),
    ("TrainerConfig", call_config, dict(batch_size=True), ValueError, "batch_size"),
    ("TrainerConfig", call_config, dict(grad_accum_steps=0), ValueError, "grad_accum_steps"),
    ("TrainerConfig", call_config, dict(max_length=1), ValueError, "max_length"),
    ("TrainerConfig", call_config, dict(max_length="64"), ValueError, "max_length"),
    ("TrainerConfig", call_config, dict(truncation_mode="middle"), ValueError, "truncation_mode"),
    ("TrainerConfig", call_config, dict(impl="fast"), ValueError, "impl"),
    ("TrainerConfig", call_config, dict(seed=-1), ValueError, "seed"),
    ("TrainerConfig", call_config, dict(seed=1.5), ValueError, "seed"),
    ("TrainerConfig", call_config, dict(shuffle="yes"), TypeError, "shuffle"),
    ("TrainerConfig", call_config, dict(disable_dropout=1), TypeError, "disable_dropout"),
    ("TrainerConfig", call_config, dict(beta=NAN), ValueError, "beta"),
    ("TrainerConfig", call_config, dict(label_smoothing=0.7), ValueError, "label_smoothing"),
    ("TrainerConfig", call_config, dict(label_smoothing=NAN), ValueError, "label_smoothing"),
    ("TrainerConfig", call_config, dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError,
     "loss_weights"),
    ("TrainerConfig", call_config, dict(loss_type=["simpo", "sigmoid"]), ValueError, "simpo"),
    ("TrainerConfig", call_config, dict(loss_type=None), TypeError, "loss_type"),
    ("TrainerConfig", call_config, dict(simpo_gamma=NAN), ValueError, "simpo_gamma"),
    ("TrainerConfig", call_config, dict(discopop_tau=-1.0), ValueError, "discopop_tau"),
    # StandardTrainer
    ("StandardTrainer", call_trainer, dict(config={"beta": 0.1}), TypeError, "config"),
    ("StandardTrainer", call_trainer, dict(examples=[]), ValueError, "examples"),
    ("StandardTrainer", call_trainer, dict(ref_cache="x.sqlite", ref_model=torch.nn.Linear(1, 1)), ValueError,
     "ref_cache"),
    ("StandardTrainer", call_trainer, dict(pad_token_id=None), ValueError, "pad_token_id"),
    ("StandardTrainer.train", call_trainer, dict(steps=-1), ValueError, "steps"),
    ("StandardTrainer.train", call_trainer, dict(steps=2.0), ValueError, "steps"),
    # cache
    ("RefLogpsCache.open", call_cache_open, dict(check="fast"), ValueError, "check"),
    ("RefLogpsCache.open", call_cache_open, dict(), FileNotFoundError, "absent.sqlite"),
    ("RefLogpsCache.create_or_open", call_cache_create, dict(fingerprint={"model": "x"}), TypeError, "fingerprint"),
    ("RefLogpsCache.create_or_open", call_cache_create, dict(path="/nonexistent-dir/ref.sqlite"), FileNotFoundError,
     "/nonexistent-dir"),
    ("build_fingerprint", call_fingerprint, dict(dtype="float8"), ValueError, "dtype"),
    ("build_fingerprint", call_fingerprint, dict(ld_alpha=2.0), ValueError, "ld_alpha"),
    ("build_fingerprint", call_fingerprint, dict(store_dtype="half"), ValueError, "store_dtype"),
    ("dataset_with_ref_logps", call_dataset_with_ref, dict(), ValueError, "prompt_ids"),
    # precompute API
    ("precompute", call_precompute, dict(batch_size=0), ValueError, "batch_size"),
    ("precompute", call_precompute, dict(dtype="float8"), ValueError, "dtype"),
    ("precompute", call_precompute, dict(temperature=NAN), ValueError, "temperature"),
    ("precompute", call_precompute, dict(max_length=1), ValueError, "max_length"),
    ("precompute", call_precompute, dict(truncation_mode="middle"), ValueError, "truncation_mode"),
    ("precompute", call_precompute, dict(ld_alpha=1.5), ValueError, "ld_alpha"),
    ("precompute", call_precompute, dict(store_dtype="float16"), ValueError, "store_dtype"),
    ("precompute", call_precompute, dict(model="/nonexistent-model"), FileNotFoundError, "/nonexistent-model"),
    # TRL integration
    ("add_fused_lm_head", call_fused_head, dict(temperature=NAN), ValueError, "temperature"),
    ("add_fused_lm_head", call_fused_head, dict(outputs=("bad",)), ValueError, "outputs"),
    ("add_fused_lm_head", call_fused_head, dict(impl="x"), ValueError, "impl"),
    ("patch", call_patch, dict(impl="x"), ValueError, "impl"),
]

_NEEDS_TMP = {call_cache_open, call_cache_create, call_precompute, call_dataset_with_ref}


def _id(case):
    name, _, bad, exc, _ = case
    shown = ",".join(f"{k}={'tensor' if isinstance(v, torch.Tensor) else v!r}" for k, v in bad.items())
    return f"{name}[{shown[:60]}]"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_refused_before_any_work(case, tripwires, tmp_path):
    name, caller, bad, exc, names = case
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in bad.items()}
    with pytest.raises(exc) as err:
        caller(tmp_path, **kwargs) if caller in _NEEDS_TMP else caller(**kwargs)
    assert not isinstance(err.value, WorkReached)
    assert names in str(err.value), f"{name}: the message does not name {names!r}: {err.value}"
    assert tripwires == [], f"{name}: work was reached before the error: {tripwires}"


def test_the_table_covers_every_public_entry_point():
    covered = {case[0].split(".")[0].rstrip("()") for case in CASES}
    public = {"linear_logprobs", "logits_logprobs", "sequence_logps", "LinearLogprobs", "dpo_loss",
              "fused_linear_dpo_loss", "FusedLinearDPOLoss", "reference_dpo_loss", "completion_logps",
              "sequence_logps_from_model", "TrainerConfig", "StandardTrainer", "RefLogpsCache", "build_fingerprint",
              "dataset_with_ref_logps", "precompute", "add_fused_lm_head", "patch",
              "vocab_parallel_linear_logprobs", "VocabParallelLinearLogprobs"}
    assert public <= covered, f"entry points without a bad-input case: {sorted(public - covered)}"
    assert len(CASES) >= 150


def test_tripwires_fire_on_good_input(tripwires):
    """The tripwires are live: a valid call reaches the work (so a silent pass above means 'before')."""
    with pytest.raises(WorkReached):
        call_fused()
    with pytest.raises(WorkReached):
        call_dpo()
    with pytest.raises(WorkReached):
        call_linear()
    assert tripwires and math.isfinite(len(tripwires))
