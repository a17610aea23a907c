#!/usr/bin/env python3
"""psft against the real code of verl 0.9.1 and TRL 1.16.0 (scripts/check-peers.sh).

Every case runs the same seeded inputs through the peer's own function and
through psft (the test-only extension tests/peers/psft_peers.cpp, which calls
the presets of include/psft/compat/), and compares the loss, the gradient
(autograd on both sides: with respect to the log-probabilities, or to the
logits on the from-logits paths) and every metric both report.

How each peer function is called
--------------------------------
verl (verl.trainer.ppo.core_algos, verl.utils.torch_functional):
  - get_policy_loss_fn(config.policy_loss.loss_mode) as ppo_loss calls it:
    compute_policy_loss_vanilla, and compute_policy_loss_gspo, _cispo and
    _sapo for the loss_mode rows (compat::verl::loss_options with the same
    loss_mode, tau_pos, tau_neg), with a real verl.workers.config.ActorConfig
    (strategy "fsdp", rollout_n 1, ppo_micro_batch_size_per_gpu 1,
    policy_loss = PolicyLossConfig(loss_mode) where the case sets one, and
    the clip/aggregation/tau fields of the case; fields the case leaves unset
    keep ActorConfig's defaults). Its global_batch_info dict is filled as
    verl.workers.utils.losses.ppo_loss fills it (dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor = config.loss_scale_factor); None
    counts select agg_loss's local path. The response mask is bool, as
    ppo_loss makes it. gspo runs in every loss_agg_mode; sapo is compared
    with several loss_agg_modes, which verl and psft both ignore for it
    (seq-mean-token-mean). Metrics: pg_clipfrac, pg_clipfrac_lower (0 for
    gspo, cispo and sapo) and ppo_kl against psft's clip_frac, clip_frac_dual
    and approx_kl_k1.
  - kl_penalty(logprob, ref_logprob, kl_penalty=kl_loss_type) for every
    kl_loss_type (kl, k1, abs, mse, k2, low_var_kl, k3 and the straight-
    through k1+, abs+, k3+, low_var_kl+), aggregated by agg_loss with the
    actor's loss_agg_mode and global_batch_info as ppo_loss does for
    use_kl_loss, against psft::kl_penalty with
    compat::verl::kl_estimator(kl_loss_type) and the actor's loss_options;
    log-ratios up to +-25 (beyond k3's clamps). psft's kl_mean is compared
    with verl_F.masked_mean of the per-token estimate.
  - agg_loss directly on arbitrary loss matrices, against psft::sft_loss (Nll
    on logp = -loss_mat), which aggregates with the same reduction code.
  - Data parallel: the batch is split into D rank shards; each rank's loss
    uses its shard, dp_size D and the global counts; the per-rank losses and
    gradients are compared, and on both sides the DDP average (gradients /
    D) must equal the gradient of the whole batch.
  - logprobs_from_logits (on the CPU: logprobs_from_logits_v2) and
    entropy_from_logits on logits divided by the temperature as verl's FSDP
    engine does (_scale_logits_by_temperature: a float32 temperature tensor),
    against psft::token_logprobs with LogitsOptions::temperature.
    Temperatures are exact in float32, so the float32 cast is no difference.
  - The PSFT recipe (compat::verl::psft_recipe) end to end from logits:
    psft::policy_loss_from_logits with advantage 1 against verl's helpers +
    the vanilla loss with clip 0.2 / 0.28, clip_ratio_c 10, token-mean.
TRL (trl.trainer.grpo_trainer, trl.trainer.sft_trainer):
  - GRPOTrainer._compute_loss, the real method, called unbound on a plain
    object that has only the attributes the method reads (set as
    GRPOTrainer.__init__ sets them from a GRPOConfig-like args namespace);
    its _get_per_token_logps_and_entropies returns a leaf tensor of
    log-probabilities we own, so autograd reaches it; accelerator.reduce and
    gather are the identity (one process; with num_processes > 1 the metrics
    are compared per rank, psft's being per call too). Against
    psft::policy_loss with compat::trl::grpo_loss_options per micro-batch.
    With gradient accumulation both sides sum the micro-batch losses. The
    metrics TRL appends to _metrics["train"] (clip_ratio/low_mean,
    high_mean, region_mean) are compared with psft's clip_frac_low,
    clip_frac_high and their sum; cispo's cispo_clip_ratio with clip_frac.
    At importance_sampling_level "sequence" TRL's clip metrics are means
    over rows (empty ones included) while psft's are over tokens, so they
    are not compared there. loss_type sapo and cispo (epsilon_high 5 and
    1.3), importance_sampling_level "sequence", and beta != 0 with
    inputs["ref_per_token_logps"] (use_bias_correction_kl False): psft adds
    beta x psft::kl_penalty(K3Unclamped) with the same options, and its
    kl_mean is compared with TRL's "kl" metric. TRL's sapo temperatures are
    float32 (torch.where on two Python floats): the sapo rows use
    temperatures float32 represents (1.0 / f32(1.05), 0.5 / 2.0), one row
    TRL's defaults 1.0 / 1.05.
  - SFTTrainer.compute_loss, the real method, on a plain object likewise,
    with a fake model whose forward(fused_lm_head=True) returns TRL's own
    FusedCausalLMOutput with log_probs (zero at ignored labels), label_mask,
    entropy and is_top1, the fields compute_loss reads: TRL's real fused LM
    head computes in float32 only, and the fake forward keeps the
    comparison in float64. On the from-logits path its log_probs and
    entropy come from TRL's own selective_log_softmax and
    entropy_from_logits. Labels are given already aligned with the logits
    (psft does not shift). A float32 spot check runs the real fused head
    (trl.trainer.utils.add_fused_lm_head, as SFTTrainer adds it) on a
    minimal torch module (an embedding backbone and an lm_head), against
    psft::sft_loss_from_logits on the same logits and shifted labels.

Intended differences (asserted as differences, never hidden)
-------------------------------------------------------------
  - An empty batch: psft's loss is 0 with zero gradients; verl's token-mean
    and seq-mean local paths divide 0 by 0 and give NaN.
  - verl's gspo clamps the sequence log-ratio only from above (at 10), psft
    at +-10 (compat/verl.hpp); the gspo inputs keep every row's mean
    log-ratio above -9.5, and one row has a mean of 10.5.
  - TRL does not clamp the log-ratio; psft clamps it at +-20 as verl does.
    The TRL cases keep |log-ratio| < 20; one case with |log-ratio| up to 25
    asserts that psft equals TRL on inputs clamped to +-20 and that the
    gradients agree exactly where |log-ratio| < 20.
  - verl divides by (count + 1e-8) in masked_mean and in seq-mean-token-mean.
    With ppo_loss's bool mask the count is an integer tensor and the sum
    with 1e-8 is float32, in which count + 1e-8 == count: no difference. With
    a float64 mask the results move by about 1e-8 / count relative, so the
    float-mask case compares at 1e-7 relative.
  - verl's pg_clipfrac / pg_clipfrac_lower and TRL's clip_ratio metrics are
    means of float32 indicators (float32 division); psft's float64 fractions
    are compared with them to one float32 rounding (2^-23 relative).

Tolerances: float64 1e-12, relative to the larger magnitude of the two
values (for tensors: of their largest entry). Spot checks, psft on float32 /
bf16 inputs against the peer in float64 on the same (exactly representable)
inputs, |log-ratio| <= 3: loss 2e-6 (float32) and 2e-5 (bf16), gradient 2e-6
(float32) and 2^-7 (bf16: psft returns it in bf16, one rounding), log-probs
and entropy 2e-6 (psft accumulates in float32 for both). TRL's real fused LM
head (float32 throughout) against psft in float32: loss and entropy 2e-6,
gradients 1e-5.
"""

import atexit
import os
import shutil
import sys
import time
import types
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import standins  # noqa: E402

STANDIN_DIR = standins.install()
atexit.register(shutil.rmtree, STANDIN_DIR, True)

START = time.time()
import torch  # noqa: E402
import torch.utils.cpp_extension as cpp_extension  # noqa: E402

F64_TOL = 1e-12
F32_ROUND = 2.0**-23
FLOAT_MASK_TOL = 1e-7
SPOT_EXTREME = 3.0  # |log-ratio| range of the float32 / bf16 spot checks


def log(msg):
    print("check-peers: " + msg, flush=True)


def build_extension():
    build_dir = os.path.join(ROOT, "build", "peers")
    os.makedirs(build_dir, exist_ok=True)
    # torch's JIT build waits for this file to disappear; a build killed
    # midway leaves it behind. A real build takes a minute or two.
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
        log("removing a stale %s" % lock)
        os.remove(lock)
    t = time.time()
    module = cpp_extension.load(
        name="psft_peers",
        sources=[os.path.join(HERE, "psft_peers.cpp")],
        extra_include_paths=[os.path.join(ROOT, "include"), "/usr/include/eigen3"],
        extra_cflags=["-O1"],
        build_directory=build_dir,
        verbose=False,
    )
    log("extension ready in %.1f s (%s)" % (time.time() - t, build_dir))
    return module


# ---------------------------------------------------------------------------
# Comparison bookkeeping


def as_tensor(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).reshape(-1)
    return torch.tensor([float(x)], dtype=torch.float64)


class Case:
    """One row of the summary: the largest differences of its comparisons."""

    def __init__(self, group, name):
        self.group, self.name = group, name
        self.diff = {"loss": 0.0, "grad": 0.0, "metrics": 0.0}
        self.compared = {"loss": False, "grad": False, "metrics": False}
        self.worst = 0.0  # largest relative difference / its tolerance
        self.failures = []
        self.notes = []

    def compare(self, kind, label, mine, peer, rtol):
        a, b = as_tensor(mine), as_tensor(peer)
        if a.shape != b.shape:
            self.failures.append("%s: shapes %s vs %s" % (label, tuple(a.shape), tuple(b.shape)))
            return
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            self.failures.append("%s: non-finite values psft %s peer %s" % (label, a, b))
            return
        abs_diff = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(a.abs().max().item() if a.numel() else 0.0,
                    b.abs().max().item() if b.numel() else 0.0)
        rel = abs_diff / scale if scale > 0 else 0.0
        self.diff[kind] = max(self.diff[kind], abs_diff)
        self.compared[kind] = True
        self.worst = max(self.worst, rel / rtol)
        if rel > rtol:
            self.failures.append("%s: max |diff| %.3e, relative %.3e > %.1e (psft %s, peer %s)"
                                 % (label, abs_diff, rel, rtol, short(a), short(b)))

    def expect(self, condition, message):
        if not condition:
            self.failures.append(message)

    def note(self, message):
        self.notes.append(message)


def short(t):
    if t.numel() <= 4:
        return "[" + ", ".join("%.17g" % v for v in t.tolist()) + "]"
    return "[%d values, max |x| %.6g]" % (t.numel(), t.abs().max().item())


CASES = []


def case(group, name):
    c = Case(group, name)
    CASES.append(c)
    return c


def fraction_f32(value):
    """psft's float64 fraction as the float32 mean the peers compute."""
    return torch.tensor(float(value), dtype=torch.float64).to(torch.float32).to(torch.float64)


# ---------------------------------------------------------------------------
# Inputs


def policy_inputs(seed, rows=8, cols=24, extreme=30.0, adv="row", dtype=torch.float64):
    """Seeded log-probabilities with padded rows, a row with holes, a fully
    masked row, exact zeros of the log-ratio, log-ratios up to +-extreme on
    about 15% of the tokens (masked ones too), and advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    lengths[0] = cols
    lengths[1] = 0  # fully masked row
    mask = torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)
    mask[2, 1::3] = False  # holes (multi-turn tool tokens)
    old = -(torch.rand(rows, cols, generator=g, dtype=torch.float64) * 6 + 0.05)
    log_ratio = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.25
    pick = torch.rand(rows, cols, generator=g) < 0.15
    log_ratio[pick] = (torch.rand(int(pick.sum()), generator=g, dtype=torch.float64) * 2 - 1) * extreme
    log_ratio[torch.rand(rows, cols, generator=g) < 0.05] = 0.0
    logp = old + log_ratio
    if adv == "row":
        advantages = torch.randn(rows, generator=g, dtype=torch.float64)
        advantages[3] = -abs(advantages[3]) - 0.5
        advantages[4] = abs(advantages[4]) + 0.5
    elif adv == "token":
        advantages = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    else:  # one scalar
        advantages = torch.tensor(-0.7, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), advantages.to(dtype), mask


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# ---------------------------------------------------------------------------
# verl

VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
              "seq-mean-token-sum-norm"]


def verl_config(actor):
    """A real ActorConfig; the case's loss_mode goes where verl reads it,
    policy_loss.loss_mode (a PolicyLossConfig)."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    fields = dict(actor)
    loss_mode = fields.pop("loss_mode", None)
    if loss_mode is not None:
        fields["policy_loss"] = PolicyLossConfig(loss_mode=loss_mode)
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


def verl_fill_global_batch_info(config, info):
    """As verl.workers.utils.losses.ppo_loss fills it."""
    config.global_batch_info["dp_size"] = info.get("dp_size", 1)
    config.global_batch_info["batch_num_tokens"] = info.get("batch_num_tokens")
    config.global_batch_info["global_batch_size"] = info.get("global_batch_size")
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor


def verl_pg_loss(core_algos, logp, old, adv, mask, actor, info):
    """verl's policy loss as ppo_loss calls it: the function registered for
    config.policy_loss.loss_mode (vanilla unless the case sets loss_mode),
    with loss_agg_mode = config.loss_agg_mode. verl's advantages are per
    token ([B, T]); psft also takes one per row ([B]) or a scalar, which verl
    gets expanded."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logp)
    config = verl_config(actor)
    verl_fill_global_batch_info(config, info)
    loss_fn = core_algos.get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    return loss_fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                   loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None)


def psft_info(info):
    """verl's counts (ints) as the extension's GlobalBatchInfo dict."""
    out = {"dp_size": info.get("dp_size", 1)}
    for key in ("batch_num_tokens", "global_batch_size"):
        if info.get(key) is not None:
            out[key] = float(info[key])
    return out


def compare_verl_metrics(c, label, psft_metrics, verl_metrics, float_mask=False, kl_tol=None):
    """verl's metrics are .item() floats. Its clip fractions are float32 means
    with a bool mask, float64 ones (count + 1e-8) with a float64 mask."""
    tol_frac = FLOAT_MASK_TOL if float_mask else F32_ROUND
    tol_kl = kl_tol or (FLOAT_MASK_TOL if float_mask else F64_TOL)
    as_verl = (lambda x: x) if float_mask else fraction_f32
    c.compare("metrics", label + " pg_clipfrac", as_verl(psft_metrics["clip_frac"]),
              verl_metrics["actor/pg_clipfrac"], tol_frac)
    c.compare("metrics", label + " pg_clipfrac_lower", as_verl(psft_metrics["clip_frac_dual"]),
              verl_metrics["actor/pg_clipfrac_lower"], tol_frac)
    c.compare("metrics", label + " ppo_kl", psft_metrics["approx_kl_k1"], verl_metrics["actor/ppo_kl"],
              tol_kl)


def run_verl_policy(ext, core_algos, c, inputs, actor, info, tol=F64_TOL, float_mask=False,
                    label="loss"):
    """One call on each side; returns (psft loss, verl loss, psft grad, verl grad)."""
    logp, old, adv, mask = inputs
    verl_mask = mask.to(torch.float64) if float_mask else mask
    x_psft, x_verl = leaf(logp), leaf(logp)
    mine = ext.verl_policy_loss(x_psft, old, adv, verl_mask, dict(actor), psft_info(info))
    peer_loss, peer_metrics = verl_pg_loss(core_algos, x_verl, old, adv, verl_mask, actor, info)
    g_psft, g_verl = grad_of(mine["loss"], x_psft), grad_of(peer_loss, x_verl)
    c.compare("loss", label, mine["loss"], peer_loss, tol)
    c.compare("grad", label + " grad", g_psft, g_verl, tol)
    compare_verl_metrics(c, label, mine["metrics"], peer_metrics, float_mask)
    return mine["loss"], peer_loss, g_psft, g_verl


def run_verl_split(ext, core_algos, c, inputs, actor, parts, dp):
    """The rows in `parts` micro-batches (dp 1: gradient accumulation) or dp
    ranks, each with the whole batch's global counts: every part is compared,
    and on each side the step (gradients / dp, losses summed / dp) must be the
    whole batch's."""
    logp, old, adv, mask = inputs
    counts = global_counts(mask)
    losses_psft, losses_verl, grads_psft, grads_verl = [], [], [], []
    for rows in torch.arange(logp.shape[0]).chunk(parts):
        part = (logp[rows], old[rows], adv[rows], mask[rows])
        info = dict(counts, dp_size=dp)
        lp, lv, gp, gv = run_verl_policy(ext, core_algos, c, part, actor, info,
                                         label="part %d" % len(losses_psft))
        losses_psft.append(lp.detach())
        losses_verl.append(lv.detach())
        grads_psft.append(gp)
        grads_verl.append(gv)
    # DDP averages the ranks' gradients; micro-batch losses are summed.
    # Either way the step is the whole batch's (global counts, dp 1).
    x_psft, x_verl = leaf(logp), leaf(logp)
    whole_psft = ext.verl_policy_loss(x_psft, old, adv, mask, actor, psft_info(counts))
    whole_verl, _ = verl_pg_loss(core_algos, x_verl, old, adv, mask, actor, counts)
    step_psft = torch.cat(grads_psft) / dp
    step_verl = torch.cat(grads_verl) / dp
    c.compare("grad", "psft step grad vs psft whole-batch grad", step_psft,
              grad_of(whole_psft["loss"], x_psft), F64_TOL)
    c.compare("grad", "verl step grad vs verl whole-batch grad", step_verl,
              grad_of(whole_verl, x_verl), F64_TOL)
    c.compare("loss", "psft sum of parts / dp vs whole", sum(losses_psft) / dp,
              whole_psft["loss"], F64_TOL)
    c.compare("loss", "verl sum of parts / dp vs whole", sum(losses_verl) / dp,
              whole_verl, F64_TOL)


def global_counts(mask):
    return {"batch_num_tokens": int(mask.sum()), "global_batch_size": int(mask.shape[0])}


def verl_cases(ext, core_algos):
    settings = {
        "default": {},
        "psft": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0},
        "c1.5": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 1.5},
    }
    seed = 100
    for mode in VERL_MODES:
        for set_name, clip in settings.items():
            for adv in ("row", "token"):
                seed += 1
                inputs = policy_inputs(seed, adv=adv)
                actor = dict(clip, loss_agg_mode=mode)
                # Local path: no global counts, dp 1.
                c = case("verl vanilla", "%s %s adv=%s local" % (mode, set_name, adv))
                run_verl_policy(ext, core_algos, c, inputs, actor, {})
                # Global counts of this mini-batch, dp 1.
                c = case("verl vanilla", "%s %s adv=%s global" % (mode, set_name, adv))
                run_verl_policy(ext, core_algos, c, inputs, actor, global_counts(inputs[3]))
        # loss_scale_factor (seq-mean-token-sum-norm reads it).
        if mode == "seq-mean-token-sum-norm":
            for info_name in ("local", "global"):
                inputs = policy_inputs(seed + 50)
                info = {} if info_name == "local" else global_counts(inputs[3])
                c = case("verl vanilla", "%s loss_scale_factor=64 %s" % (mode, info_name))
                run_verl_policy(ext, core_algos, c, inputs,
                                {"loss_agg_mode": mode, "loss_scale_factor": 64}, info)
        # Scalar advantage.
        c = case("verl vanilla", "%s default adv=scalar local" % mode)
        run_verl_policy(ext, core_algos, c, policy_inputs(seed + 60, adv="scalar"),
                        {"loss_agg_mode": mode}, {})

    # clip_ratio alone: verl's ActorConfig (and actor.yaml) default
    # clip_ratio_low and clip_ratio_high to 0.2, not to None, so verl falls
    # back to clip_ratio only where they are set to None explicitly.
    c = case("verl vanilla", "token-mean clip_ratio=0.3 only (ActorConfig low/high 0.2)")
    run_verl_policy(ext, core_algos, c, policy_inputs(7),
                    {"loss_agg_mode": "token-mean", "clip_ratio": 0.3}, {})
    c = case("verl vanilla", "token-mean clip_ratio=0.3, clip_ratio_low/high None")
    run_verl_policy(ext, core_algos, c, policy_inputs(7),
                    {"loss_agg_mode": "token-mean", "clip_ratio": 0.3, "clip_ratio_low": None,
                     "clip_ratio_high": None}, {})

    # dp_size > 1 without the mode's global count: both refuse.
    for mode in ("token-mean", "seq-mean-token-mean"):
        c = case("verl vanilla", "%s dp_size=2 without global counts: both refuse" % mode)
        logp, old, adv, mask = policy_inputs(8)
        try:
            verl_pg_loss(core_algos, logp, old, adv, mask, {"loss_agg_mode": mode},
                         {"dp_size": 2})
            c.expect(False, "verl accepted dp_size 2 without global counts")
        except ValueError:
            pass
        try:
            ext.verl_policy_loss(logp, old, adv, mask, {"loss_agg_mode": mode}, {"dp_size": 2})
            c.expect(False, "psft accepted dp_size 2 without global counts")
        except RuntimeError:
            pass

    # Micro-batches of one mini-batch (gradient accumulation, dp 1) and dp
    # ranks, each with the mini-batch's global counts.
    for mode in VERL_MODES:
        for parts, dp in ((2, 1), (2, 2), (4, 4)):
            inputs = policy_inputs(300 + parts * 10 + dp, rows=8)
            actor = {"loss_agg_mode": mode, "clip_ratio_high": 0.28}
            what = "ranks" if dp > 1 else "micro-batches"
            c = case("verl split", "%s %d %s dp=%d" % (mode, parts, what, dp))
            run_verl_split(ext, core_algos, c, inputs, actor, parts, dp)

    # A float64 mask: verl's (count + 1e-8) stays float64 (see the docstring).
    for mode in VERL_MODES:
        c = case("verl vanilla", "%s float64 mask (count + 1e-8: 1e-7)" % mode)
        run_verl_policy(ext, core_algos, c, policy_inputs(400), {"loss_agg_mode": mode}, {},
                        tol=FLOAT_MASK_TOL if mode == "seq-mean-token-mean" else F64_TOL,
                        float_mask=True)

    # Log-ratios exactly +-20 (old -25, logp -5 and back): the clamp's
    # gradient is 0 at the bound on both sides (torch >= 2.14's clamp backward).
    rows, cols = 4, 6
    old = torch.full((rows, cols), -25.0, dtype=torch.float64)
    logp = torch.full((rows, cols), -5.0, dtype=torch.float64)
    old[:, ::2], logp[:, ::2] = -5.0, -25.0
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for adv_value in (1.0, -1.0):
        for mode in ("token-mean", "seq-mean-token-mean"):
            adv = torch.full((rows,), adv_value, dtype=torch.float64)
            adv[1::2] *= 0.5
            c = case("verl vanilla", "log-ratio exactly +-20, A %+g, %s" % (adv_value, mode))
            _, _, g_psft, g_verl = run_verl_policy(ext, core_algos, c, (logp, old, adv, mask),
                                                   {"loss_agg_mode": mode}, {})
            c.expect(bool((g_verl == 0).all()), "verl's gradient at |log-ratio| = 20 is not 0")

    # Empty batch: psft 0 with zero gradients; verl NaN where it divides 0 by 0.
    logp, old, adv, mask = policy_inputs(500)
    mask = torch.zeros_like(mask)
    for mode in VERL_MODES:
        for info_name in ("local", "global"):
            # global: an empty micro-batch of a mini-batch that has tokens.
            info = {} if info_name == "local" else {"batch_num_tokens": 50, "global_batch_size": 16}
            c = case("verl empty", "%s %s" % (mode, info_name))
            x_psft, x_verl = leaf(logp), leaf(logp)
            mine = ext.verl_policy_loss(x_psft, old, adv, mask, {"loss_agg_mode": mode},
                                        psft_info(info))
            peer_loss, peer_metrics = verl_pg_loss(core_algos, x_verl, old, adv, mask,
                                                   {"loss_agg_mode": mode}, info)
            g_psft, g_verl = grad_of(mine["loss"], x_psft), grad_of(peer_loss, x_verl)
            verl_nan = mode != "token-sum" and info_name == "local"
            psft_loss = float(mine["loss"].detach())
            c.expect(psft_loss == 0.0 and bool((g_psft == 0).all()),
                     "psft's empty batch: loss %s, gradient not all zero" % psft_loss)
            if verl_nan:
                c.expect(bool(torch.isnan(peer_loss)),
                         "verl's loss on an empty batch was expected NaN, got %s"
                         % float(peer_loss.detach()))
                c.note("intended: verl NaN (0/0), psft 0")
            else:
                c.compare("loss", "loss", mine["loss"], peer_loss, F64_TOL)
                c.compare("grad", "grad", g_psft, g_verl, F64_TOL)
            compare_verl_metrics(c, "empty", mine["metrics"], peer_metrics)

    # agg_loss on its own, on arbitrary per-token values, against sft_loss(-x).
    for mode in VERL_MODES:
        for info_name in ("local", "global"):
            logp, _, _, mask = policy_inputs(600)
            g = torch.Generator().manual_seed(601)
            loss_mat = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 3
            info = {} if info_name == "local" else global_counts(mask)
            actor = {"loss_agg_mode": mode}
            if mode == "seq-mean-token-sum-norm":
                actor["loss_scale_factor"] = 10
            c = case("verl agg_loss", "%s %s" % (mode, info_name))
            x_psft, x_verl = leaf(loss_mat), leaf(loss_mat)
            mine = ext.verl_agg_loss(x_psft, mask, actor, psft_info(info))
            config = verl_config(actor)
            verl_fill_global_batch_info(config, info)
            peer = core_algos.agg_loss(loss_mat=x_verl, loss_mask=mask, loss_agg_mode=mode,
                                       **config.global_batch_info)
            c.compare("loss", "loss", mine["loss"], peer, F64_TOL)
            c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer, x_verl),
                      F64_TOL)


def row_mean_log_ratio(logp, old, mask):
    """Each row's mean log-ratio over its unmasked tokens (count clamped to 1),
    as verl's gspo and TRL's sequence level compute it."""
    m = mask.to(logp.dtype)
    return ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)


def gspo_inputs(seed, adv="row", above=None, dtype=torch.float64, extreme=19.5):
    """policy_inputs with every row's mean log-ratio above -10 (verl's gspo
    clamps log s only from above, psft at +-10: see the docstring): a row
    whose mean is below -9 gets its log-ratios shifted up to a mean of -4.
    `above`: that row's mean is moved to 10.5 (s clamped at e^10 by both)."""
    logp, old, advantages, mask = policy_inputs(seed, extreme=extreme, adv=adv)
    means = row_mean_log_ratio(logp, old, mask)
    shift = torch.where(means < -9.0, -4.0 - means, torch.zeros_like(means))
    if above is not None:
        shift[above] = 10.5 - means[above]
    logp = logp + shift.unsqueeze(1) * mask
    assert bool((row_mean_log_ratio(logp, old, mask)[mask.any(-1)] > -9.5).all())
    return logp.to(dtype), old.to(dtype), advantages.to(dtype), mask


def verl_objective_cases(ext, core_algos):
    """verl's gspo, cispo and sapo policy losses (compat::verl::loss_options
    with loss_mode), local and with global counts, in the aggregation modes
    each one reads."""
    seed = 1200
    clips = {
        "default": {},
        "psft": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
        # The GSPO paper's widths (3e-4 / 4e-4): the sequence clip binds on most rows.
        "gspo-paper": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    }
    for loss_mode, variants in (("gspo", (("default", "token"), ("gspo-paper", "row"))),
                                ("cispo", (("default", "row"), ("psft", "token")))):
        for mode in VERL_MODES:
            for clip_name, adv in variants:
                seed += 1
                if loss_mode == "gspo":
                    inputs = gspo_inputs(seed, adv=adv)
                else:
                    inputs = policy_inputs(seed, extreme=19.5, adv=adv)
                actor = dict(clips[clip_name], loss_mode=loss_mode, loss_agg_mode=mode)
                for info_name in ("local", "global"):
                    info = {} if info_name == "local" else global_counts(inputs[3])
                    c = case("verl %s" % loss_mode,
                             "%s %s adv=%s %s" % (mode, clip_name, adv, info_name))
                    run_verl_policy(ext, core_algos, c, inputs, actor, info)

    # gspo: a sequence whose mean log-ratio is above 10 (s = e^10 on both
    # sides, no gradient through the clamp). Loss and gradient agree; verl's
    # ppo_kl stays the unclamped token mean of -(logp - old), while psft's
    # approx_kl_k1 is of the ratio the objective used, log s clamped at 10:
    # an intended difference (docs/objectives.md). Below the clamp the two
    # are the same number (the token mean of each row's mean).
    c = case("verl gspo", "seq-mean-token-mean row mean log-ratio 10.5 (clamp at 10)")
    logp, old, adv, mask = gspo_inputs(1250, above=4)
    actor = {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}
    x_psft, x_verl = leaf(logp), leaf(logp)
    mine = ext.verl_policy_loss(x_psft, old, adv, mask, dict(actor), psft_info({}))
    peer_loss, peer_metrics = verl_pg_loss(core_algos, x_verl, old, adv, mask, actor, {})
    c.compare("loss", "loss", mine["loss"], peer_loss, F64_TOL)
    c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer_loss, x_verl), F64_TOL)
    c.compare("metrics", "pg_clipfrac", fraction_f32(mine["metrics"]["clip_frac"]),
              peer_metrics["actor/pg_clipfrac"], F32_ROUND)
    psft_kl, verl_kl = float(mine["metrics"]["approx_kl_k1"]), float(peer_metrics["actor/ppo_kl"])
    c.expect(abs(psft_kl - verl_kl) > 1e-6, "ppo_kl was expected to differ above the clamp")
    c.note("intended: verl ppo_kl %.6g (unclamped token mean), psft approx_kl_k1 %.6g (of log s "
           "clamped at 10)" % (verl_kl, psft_kl))
    c = case("verl gspo", "seq-mean-token-mean adv=scalar local")
    logp, old, _, mask = gspo_inputs(1251)
    run_verl_policy(ext, core_algos, c, (logp, old, torch.tensor(0.9, dtype=torch.float64), mask),
                    {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}, {})

    # sapo: verl aggregates by seq-mean-token-mean whatever loss_agg_mode says.
    taus = {"default": {}, "tau 2/3": {"tau_pos": 2.0, "tau_neg": 3.0}}
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"):
        for tau_name, adv in (("default", "row"), ("tau 2/3", "token")):
            seed += 1
            inputs = policy_inputs(seed, extreme=19.5, adv=adv)
            actor = dict(taus[tau_name], loss_mode="sapo", loss_agg_mode=agg)
            for info_name in ("local", "global"):
                if agg != "seq-mean-token-mean" and info_name == "global":
                    continue
                info = {} if info_name == "local" else global_counts(inputs[3])
                c = case("verl sapo", "loss_agg_mode=%s %s adv=%s %s"
                         % (agg, tau_name, adv, info_name))
                run_verl_policy(ext, core_algos, c, inputs, actor, info)

    # Ranks and micro-batches with the global counts.
    for loss_mode, mode, make in (("gspo", "seq-mean-token-mean", gspo_inputs),
                                  ("cispo", "token-mean", policy_inputs),
                                  ("sapo", "seq-mean-token-mean", policy_inputs)):
        for parts, dp in ((2, 1), (4, 4)):
            seed += 1
            actor = {"loss_mode": loss_mode, "loss_agg_mode": mode, "clip_ratio_high": 0.28}
            what = "ranks" if dp > 1 else "micro-batches"
            c = case("verl split", "%s %s %d %s dp=%d" % (loss_mode, mode, parts, what, dp))
            inputs = make(seed) if make is gspo_inputs else make(seed, extreme=19.5)
            run_verl_split(ext, core_algos, c, inputs, actor, parts, dp)


VERL_KL_TYPES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k3+",
                 "low_var_kl+"]


def verl_kl_inputs(seed, extreme=25.0, dtype=torch.float64):
    """logp and ref_logp with log-ratios of both signs, exact zeros and up to
    +-extreme (beyond K3's clamps at 20 and 10), and policy_inputs' masks."""
    logp, ref, _, mask = policy_inputs(seed, extreme=extreme)
    return logp.to(dtype), ref.to(dtype), mask


def verl_kl_aggregations(mask):
    """(label, actor, info) of the aggregations each kl_loss_type is compared in."""
    counts = global_counts(mask)
    return [
        ("token-mean local", {"loss_agg_mode": "token-mean"}, {}),
        ("token-mean global dp=2", {"loss_agg_mode": "token-mean"}, dict(counts, dp_size=2)),
        ("token-sum", {"loss_agg_mode": "token-sum"}, {}),
        ("seq-mean-token-mean local", {"loss_agg_mode": "seq-mean-token-mean"}, {}),
        ("seq-mean-token-sum global", {"loss_agg_mode": "seq-mean-token-sum"}, counts),
        ("seq-mean-token-sum-norm C=16", {"loss_agg_mode": "seq-mean-token-sum-norm",
                                          "loss_scale_factor": 16}, {}),
    ]


def verl_kl_peer(core_algos, logp, ref, mask, kl_type, actor, info):
    """verl's use_kl_loss term as ppo_loss computes it: kl_penalty, then
    agg_loss with the actor's loss_agg_mode and global_batch_info."""
    config = verl_config(actor)
    verl_fill_global_batch_info(config, info)
    kld = core_algos.kl_penalty(logprob=logp, ref_logprob=ref, kl_penalty=kl_type)
    loss = core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode,
                               **config.global_batch_info)
    return loss, kld


def verl_kl_cases(ext, core_algos, verl_F):
    """psft::kl_penalty with compat::verl::kl_estimator(kl_loss_type) against
    verl's kl_penalty + agg_loss; kl_mean against verl's masked_mean (its
    kl_loss metric under token-mean)."""
    for i, kl_type in enumerate(VERL_KL_TYPES):
        logp, ref, mask = verl_kl_inputs(1300 + i)
        c = case("verl kl", kl_type)
        estimator = None
        for label, actor, info in verl_kl_aggregations(mask):
            x_psft, x_verl = leaf(logp), leaf(logp)
            mine = ext.verl_kl_penalty(x_psft, ref, mask, kl_type, actor, psft_info(info))
            peer, kld = verl_kl_peer(core_algos, x_verl, ref, mask, kl_type, actor, info)
            c.compare("loss", label, mine["loss"], peer, F64_TOL)
            c.compare("grad", label + " grad", grad_of(mine["loss"], x_psft),
                      grad_of(peer, x_verl), F64_TOL)
            c.compare("metrics", label + " kl_mean", mine["kl_mean"],
                      verl_F.masked_mean(kld.detach(), mask), F64_TOL)
            estimator = mine["estimator"]
        c.name = "%s (%s), %d aggregations" % (kl_type, estimator,
                                               len(verl_kl_aggregations(mask)))


def verl_scale_logits(logits, temperature):
    """verl.workers.engine.fsdp.transformer_impl._scale_logits_by_temperature
    (not imported: that module needs peft): a float32 temperature tensor."""
    t = torch.tensor(temperature, dtype=torch.float32)
    if float(t) == 1.0:
        return logits
    return logits / t.clamp(min=1e-8).to(logits.dtype)


def logits_inputs(seed, rows=4, cols=10, vocab=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, vocab, generator=g, dtype=torch.float64) * 3
    logits[0, 0, 7] = 40.0  # a confident position
    labels = torch.randint(0, vocab, (rows, cols), generator=g)
    labels[1, 6:] = -100
    labels[2, :] = -100  # a row with no scored token
    return logits.to(dtype), labels


def verl_logits_cases(ext, verl_F, core_algos):
    # On the CPU, logprobs_from_logits is logprobs_from_logits_v2 (no
    # flash-attn cross entropy, no NPU).
    assert not verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE
    assert not verl_F.NPU_CROSS_ENTROPY_LOSS_AVAILABLE
    for temperature in (1.0, 0.75, 1.5):
        logits, labels = logits_inputs(700)
        scored = labels != -100
        safe = labels.clamp(min=0)
        g = torch.Generator().manual_seed(701)
        w_logp = torch.randn(labels.shape, generator=g, dtype=torch.float64) * scored
        w_ent = torch.randn(labels.shape, generator=g, dtype=torch.float64) * scored
        c = case("verl logits", "logprobs_from_logits/entropy_from_logits T=%g" % temperature)
        x_psft, x_verl = leaf(logits), leaf(logits)
        mine = ext.token_logprobs(x_psft, labels, temperature, True)
        z = verl_scale_logits(x_verl, temperature)
        peer_logp = verl_F.logprobs_from_logits(z, safe)
        peer_ent = verl_F.entropy_from_logits(z)
        c.compare("loss", "logp", mine["logp"][scored], peer_logp[scored], F64_TOL)
        c.compare("metrics", "entropy", mine["entropy"][scored], peer_ent[scored], F64_TOL)
        c.expect(bool((mine["logp"][~scored] == 0).all() and (mine["entropy"][~scored] == 0).all()),
                 "psft's logp/entropy at ignore_index are not 0")
        objective_psft = (w_logp * mine["logp"]).sum() + (w_ent * mine["entropy"]).sum()
        objective_verl = (w_logp * peer_logp).sum() + (w_ent * peer_ent).sum()
        c.compare("grad", "grad wrt logits", grad_of(objective_psft, x_psft),
                  grad_of(objective_verl, x_verl), F64_TOL)

    # Spot checks: psft on float32 / bf16 logits (float32 accumulation, float32
    # outputs) against verl in float64 on the same values.
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-6)):
        logits, labels = logits_inputs(702, dtype=dtype)
        scored = labels != -100
        name = str(dtype).replace("torch.", "")
        c = case("verl %s" % name, "logprobs_from_logits/entropy_from_logits T=0.75")
        mine = ext.token_logprobs(logits, labels, 0.75, False)
        z = verl_scale_logits(logits.to(torch.float64), 0.75)
        c.compare("loss", "logp", mine["logp"][scored],
                  verl_F.logprobs_from_logits(z, labels.clamp(min=0))[scored], tol)
        c.compare("metrics", "entropy", mine["entropy"][scored],
                  verl_F.entropy_from_logits(z)[scored], tol)
        c.note("psft %s vs verl float64" % name)

    # The PSFT recipe from logits: advantage 1, clip 0.2/0.28, c 10, token-mean.
    for temperature in (1.0, 0.75):
        logits, labels = logits_inputs(710)
        scored = labels != -100
        safe = labels.clamp(min=0)
        with torch.no_grad():
            current = verl_F.logprobs_from_logits(verl_scale_logits(logits, temperature), safe)
        g = torch.Generator().manual_seed(711)
        shift = torch.randn(labels.shape, generator=g, dtype=torch.float64) * 0.3
        shift[0, :3] = torch.tensor([25.0, -25.0, 0.0], dtype=torch.float64)
        old = (current - shift) * scored
        ones = torch.ones(labels.shape, dtype=torch.float64)
        c = case("verl logits", "PSFT recipe from logits T=%g" % temperature)
        x_psft, x_verl = leaf(logits), leaf(logits)
        mine = ext.verl_psft_recipe_from_logits(x_psft, labels, old,
                                                torch.tensor(1.0, dtype=torch.float64),
                                                temperature)
        z = verl_scale_logits(x_verl, temperature)
        peer_logp = verl_F.logprobs_from_logits(z, safe)
        actor = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0,
                 "loss_agg_mode": "token-mean"}
        peer_loss, peer_metrics = verl_pg_loss(core_algos, peer_logp, old, ones, scored, actor, {})
        c.compare("loss", "loss", mine["loss"], peer_loss, F64_TOL)
        c.compare("grad", "grad wrt logits", grad_of(mine["loss"], x_psft),
                  grad_of(peer_loss, x_verl), F64_TOL)
        compare_verl_metrics(c, "recipe", mine["metrics"], peer_metrics)
        c.compare("metrics", "entropy", mine["entropy"][scored],
                  verl_F.entropy_from_logits(z.detach())[scored], F64_TOL)


def verl_spot_checks(ext, core_algos):
    """psft on float32 / bf16 inputs against verl in float64 on the same values."""
    objectives = [
        ("token-mean", {"loss_agg_mode": "token-mean"}),
        ("seq-mean-token-mean", {"loss_agg_mode": "seq-mean-token-mean"}),
        ("gspo seq-mean-token-mean", {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}),
        ("cispo token-mean", {"loss_mode": "cispo", "loss_agg_mode": "token-mean"}),
        ("sapo", {"loss_mode": "sapo"}),
    ]
    for dtype, loss_tol, grad_tol in ((torch.float32, 2e-6, 2e-6),
                                      (torch.bfloat16, 2e-5, 2.0**-7)):
        name = str(dtype).replace("torch.", "")
        for row, settings in objectives:
            logp, old, adv, mask = policy_inputs(800, extreme=SPOT_EXTREME, dtype=dtype)
            actor = dict(settings, clip_ratio_high=0.28)
            c = case("verl %s" % name, row)
            x_psft = leaf(logp)
            mine = ext.verl_policy_loss(x_psft, old, adv, mask, actor, {})
            x_verl = leaf(logp.to(torch.float64))
            peer_loss, peer_metrics = verl_pg_loss(core_algos, x_verl, old.to(torch.float64),
                                                   adv.to(torch.float64), mask, actor, {})
            c.compare("loss", "loss", mine["loss"], peer_loss, loss_tol)
            c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer_loss, x_verl),
                      grad_tol)
            compare_verl_metrics(c, "spot", mine["metrics"], peer_metrics, kl_tol=loss_tol)
            c.note("psft %s vs verl float64" % name)
        for kl_type in ("low_var_kl", "k3+", "abs"):
            logp, ref, mask = verl_kl_inputs(810, extreme=SPOT_EXTREME, dtype=dtype)
            actor = {"loss_agg_mode": "token-mean"}
            c = case("verl %s" % name, "kl_penalty %s token-mean" % kl_type)
            x_psft, x_verl = leaf(logp), leaf(logp.to(torch.float64))
            mine = ext.verl_kl_penalty(x_psft, ref, mask, kl_type, actor, {})
            peer, _ = verl_kl_peer(core_algos, x_verl, ref.to(torch.float64), mask, kl_type,
                                   actor, {})
            c.compare("loss", "loss", mine["loss"], peer, loss_tol)
            c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer, x_verl),
                      grad_tol)
            c.note("psft %s vs verl float64" % name)


# ---------------------------------------------------------------------------
# TRL GRPO


class Strict:
    """A plain object that fails on any attribute it was not given."""

    def __init__(self, name, **attrs):
        object.__setattr__(self, "_name", name)
        for k, v in attrs.items():
            object.__setattr__(self, k, v)

    def __getattr__(self, attr):
        raise AttributeError("%s has no attribute %r (the fake lacks what the peer reads)"
                             % (self._name, attr))


class IdentityAccelerator(Strict):
    def __init__(self, num_processes):
        super().__init__("accelerator", num_processes=num_processes, parallelism_config=None,
                         sync_gradients=True)

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


def trl_grpo_fake(settings, ga, beta=0.0):
    """The attributes GRPOTrainer._compute_loss reads, set the way
    GRPOTrainer.__init__ sets them from its args (GRPOConfig)."""
    args = Strict("args", epsilon=settings.get("epsilon", 0.2),
                  epsilon_high=settings.get("epsilon_high"), delta=settings.get("delta"),
                  steps_per_generation=settings.get("steps_per_generation", ga),
                  sapo_temperature_pos=settings.get("sapo_temperature_pos", 1.0),
                  sapo_temperature_neg=settings.get("sapo_temperature_neg", 1.05),
                  importance_sampling_level=settings.get("importance_sampling_level", "token"),
                  beta=beta, use_bias_correction_kl=False)
    fake = Strict(
        "GRPOTrainer",
        args=args,
        loss_type=settings["loss_type"],
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        beta=args.beta,
        importance_sampling_level=args.importance_sampling_level,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=Strict("model", training=True),
        current_gradient_accumulation_steps=ga,
        max_completion_length=settings.get("max_completion_length", 256),
        accelerator=IdentityAccelerator(settings.get("num_processes", 1)),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return fake


def trl_grpo_call(GRPOTrainer, fake, logp_leaf, old, adv, mask, num_items, ref=None):
    rows, cols = mask.shape

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == cols
        return logp_leaf, torch.zeros_like(logp_leaf), None

    object.__setattr__(fake, "_get_per_token_logps_and_entropies", per_token_logps)
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, cols, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
    }
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(num_items)
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(fake, Strict("model"), inputs)


def trl_num_items(loss_type, mask):
    """inputs["num_items_in_batch"]: the loss types that divide by it (dapo and
    cispo) get the completion tokens of the generation batch."""
    return int(mask.sum()) if loss_type in ("dapo", "cispo") else None


def compare_trl_grpo_metrics(c, label, settings, metrics, trl_metrics, beta):
    """The metrics TRL's _compute_loss appends for this loss type against
    psft's: the clip_ratio means of the clipped types and cispo_clip_ratio
    (token level only: at sequence level TRL averages them per sequence, psft
    per token, see the docstring), and with beta the token mean of the KL."""
    if settings.get("importance_sampling_level", "token") == "token":
        if settings["loss_type"] == "cispo":
            keys = (("cispo_clip_ratio", metrics["clip_frac"]),)
        elif settings["loss_type"] == "sapo":
            keys = ()
        else:
            keys = (("clip_ratio/low_mean", metrics["clip_frac_low"]),
                    ("clip_ratio/high_mean", metrics["clip_frac_high"]),
                    ("clip_ratio/region_mean",
                     metrics["clip_frac_low"] + metrics["clip_frac_high"]))
        for key, value in keys:
            c.compare("metrics", label + " " + key, fraction_f32(value), trl_metrics[key][-1],
                      F32_ROUND)
    if beta != 0.0:
        c.compare("metrics", label + " kl", metrics["kl_mean"], trl_metrics["kl"][-1], F64_TOL)


def trl_grpo_run(ext, GRPOTrainer, c, inputs, settings, ga=1, ranks=1, micro=None,
                 tol=F64_TOL, beta=0.0, ref=None, grad_differs=None):
    """TRL and psft over `ranks` x `micro` (default: ga) micro-batches of the
    rows, one generation batch (dapo's and cispo's num_items_in_batch counts
    all of it); with beta, TRL's KL term to the reference log-probabilities
    `ref` (psft: + beta kl_penalty(K3Unclamped) with the same options).
    Returns the per-micro-batch gradients of both sides."""
    logp, old, adv, mask = inputs
    mask = mask.to(torch.long)  # TRL's completion_mask is an integer tensor
    settings = dict(settings, num_processes=ranks)
    num_items = trl_num_items(settings["loss_type"], mask)
    micro = micro or ga
    parts = torch.arange(logp.shape[0]).chunk(ranks * micro)
    grads_psft, grads_trl = [], []
    for rank in range(ranks):
        fake = trl_grpo_fake(settings, ga, beta)
        total_psft, total_trl = 0.0, 0.0
        for step in range(micro):
            rows = parts[rank * micro + step]
            x_psft, x_trl = leaf(logp[rows]), leaf(logp[rows])
            ref_rows = None if ref is None else ref[rows]
            mine = ext.trl_grpo_loss(x_psft, old[rows], adv[rows], mask[rows], settings,
                                     None if num_items is None else float(num_items), ga,
                                     ref_rows, beta)
            peer = trl_grpo_call(GRPOTrainer, fake, x_trl, old[rows], adv[rows], mask[rows],
                                 num_items, ref_rows)
            grads_psft.append(grad_of(mine["loss"], x_psft))
            grads_trl.append(grad_of(peer, x_trl))
            total_psft = total_psft + mine["loss"].detach()
            total_trl = total_trl + peer.detach()
            metrics = dict(mine["metrics"], kl_mean=mine.get("kl_mean"))
            compare_trl_grpo_metrics(c, "rank %d step %d" % (rank, step), settings, metrics,
                                     fake._metrics["train"], beta)
            c.compare("loss", "rank %d step %d loss" % (rank, step), mine["loss"], peer, tol)
        c.compare("loss", "rank %d sum of %d micro-batch losses" % (rank, micro), total_psft,
                  total_trl, tol)
    g_psft, g_trl = torch.cat(grads_psft), torch.cat(grads_trl)
    if grad_differs is None:
        c.compare("grad", "grad", g_psft, g_trl, tol)
    else:
        scale = max(float(g_trl.abs().max()), 1e-300)
        c.expect(float((g_psft - g_trl).abs().max()) > tol * scale,
                 "the gradients were expected to differ (%s)" % grad_differs)
        c.note("intended: " + grad_differs)
    return g_psft, g_trl


def trl_grpo_cases(ext, GRPOTrainer):
    seed = 900
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for ga in (1, 2):
            for delta in (None, 3.0):
                for adv in ("row", "token"):
                    seed += 1
                    settings = {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": 0.28,
                                "delta": delta, "max_completion_length": 32}
                    c = case("TRL GRPO", "%s GA=%d delta=%s adv=%s" % (loss_type, ga, delta, adv))
                    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(seed, extreme=19.5, adv=adv),
                                 settings, ga=ga)
    # Defaults (epsilon 0.2 both sides, L_max 256) and a dapo step over 2 processes.
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        c = case("TRL GRPO", "%s defaults" % loss_type)
        trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(950, extreme=19.5),
                     {"loss_type": loss_type})
    c = case("TRL GRPO", "dapo 2 processes x GA=2 (per-rank losses)")
    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(951, extreme=19.5),
                 {"loss_type": "dapo", "epsilon_high": 0.28}, ga=2, ranks=2)

    # steps_per_generation 4 with GA 2: one generation batch, two optimizer steps.
    c = case("TRL GRPO", "dapo GA=2 steps_per_generation=4")
    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(952, extreme=19.5),
                 {"loss_type": "dapo", "epsilon_high": 0.28, "steps_per_generation": 4}, ga=2,
                 micro=4)

    # No log-ratio clamp in TRL: with |log-ratio| up to 25, psft equals TRL
    # on the inputs clamped to +-20, and the gradients agree where |lr| < 20.
    for loss_type in ("bnpo", "dapo"):
        logp, old, adv, mask = policy_inputs(960, extreme=25.0)
        # Tokens where the clamp changes TRL's value: rows 3 and 4 have A < 0
        # and A > 0 (policy_inputs makes them so).
        logp[3, 0], logp[4, 0] = old[3, 0] + 25.0, old[4, 0] - 25.0
        log_ratio = logp - old
        inside = (log_ratio.abs() < 20) & mask
        beyond = (log_ratio.abs() > 20) & mask
        c = case("TRL GRPO", "%s |log-ratio| up to 25 (TRL does not clamp)" % loss_type)
        c.expect(bool(beyond.any()), "the case has no token beyond the clamp")
        settings = {"loss_type": loss_type, "epsilon_high": 0.28}
        clamped = old + log_ratio.clamp(-20.0, 20.0)
        x_psft = leaf(logp)
        m = mask.to(torch.long)
        num_items = float(m.sum()) if loss_type == "dapo" else None
        mine = ext.trl_grpo_loss(x_psft, old, adv, m, settings, num_items, 1)
        x_trl, x_clamped = leaf(logp), leaf(clamped)
        peer = trl_grpo_call(GRPOTrainer, trl_grpo_fake(settings, 1), x_trl, old, adv, m,
                             None if num_items is None else int(num_items))
        peer_clamped = trl_grpo_call(GRPOTrainer, trl_grpo_fake(settings, 1), x_clamped, old, adv,
                                     m, None if num_items is None else int(num_items))
        c.compare("loss", "psft vs TRL on clamped inputs", mine["loss"], peer_clamped, F64_TOL)
        g_psft, g_trl = grad_of(mine["loss"], x_psft), grad_of(peer, x_trl)
        c.compare("grad", "grad where |lr| < 20", g_psft[inside], g_trl[inside], F64_TOL)
        c.expect(bool((g_psft[beyond] == 0).all()), "psft's gradient beyond the clamp is not 0")
        psft_loss, trl_loss = float(mine["loss"].detach()), float(peer.detach())
        differs = abs(psft_loss - trl_loss) > F64_TOL * abs(trl_loss)
        c.expect(differs, "TRL's loss on the unclamped inputs was expected to differ")
        c.note("intended: TRL %.6g, psft %.6g (no clamp)" % (trl_loss, psft_loss))

    # Spot checks: psft on float32 / bf16 inputs against TRL in float64.
    for dtype, loss_tol, grad_tol in ((torch.float32, 2e-6, 2e-6),
                                      (torch.bfloat16, 2e-5, 2.0**-7)):
        for loss_type in ("grpo", "dapo"):
            logp, old, adv, mask = policy_inputs(970, extreme=SPOT_EXTREME, dtype=dtype)
            m = mask.to(torch.long)
            settings = {"loss_type": loss_type, "epsilon_high": 0.28}
            num_items = int(m.sum()) if loss_type == "dapo" else None
            c = case("TRL %s" % str(dtype).replace("torch.", ""), loss_type)
            x_psft = leaf(logp)
            mine = ext.trl_grpo_loss(x_psft, old, adv, m, settings,
                                     None if num_items is None else float(num_items), 1)
            x_trl = leaf(logp.to(torch.float64))
            peer = trl_grpo_call(GRPOTrainer, trl_grpo_fake(settings, 1), x_trl,
                                 old.to(torch.float64), adv.to(torch.float64), m, num_items)
            c.compare("loss", "loss", mine["loss"], peer, loss_tol)
            c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer, x_trl),
                      grad_tol)


def trl_ref_logps(seed, logp, extreme=4.0):
    """Reference log-probabilities near logp: ref - logp ~ N(0, 0.5), up to
    +-extreme on about 10% of the tokens, exact zeros on about 5%."""
    g = torch.Generator().manual_seed(seed)
    diff = torch.randn(logp.shape, generator=g, dtype=torch.float64) * 0.5
    pick = torch.rand(logp.shape, generator=g) < 0.1
    diff[pick] = (torch.rand(int(pick.sum()), generator=g, dtype=torch.float64) * 2 - 1) * extreme
    diff[torch.rand(logp.shape, generator=g) < 0.05] = 0.0
    return (logp.detach().to(torch.float64) + diff).to(logp.dtype)


# TRL's default sapo_temperature_neg as TRL computes with it (float32).
TRL_SAPO_TAU_NEG_F32 = float(torch.tensor(1.05, dtype=torch.float32))


def trl_objective_cases(ext, GRPOTrainer):
    """TRL's sapo and cispo loss types, importance_sampling_level "sequence"
    and beta != 0 (its KL term), against compat::trl::grpo_loss_options
    (+ beta kl_penalty(K3Unclamped))."""
    seed = 1400
    # sapo: grpo's aggregation. TRL's temperatures are float32 (torch.where
    # on the two Python floats), so the rows give both sides temperatures
    # that float32 represents exactly: 1.0 / f32(1.05), and 0.5 / 2.0. The
    # last row keeps TRL's defaults 1.0 / 1.05 on both sides: compat::trl
    # rounds the temperatures to float32 as TRL does.
    sapo = {"loss_type": "sapo", "sapo_temperature_neg": TRL_SAPO_TAU_NEG_F32}
    for ga in (1, 2):
        for adv in ("row", "token"):
            seed += 1
            c = case("TRL sapo", "1.0 / f32(1.05) GA=%d adv=%s" % (ga, adv))
            trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(seed, extreme=19.5, adv=adv),
                         sapo, ga=ga)
    c = case("TRL sapo", "temperatures 0.5 / 2.0")
    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(1410, extreme=19.5, adv="token"),
                 {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0})
    c = case("TRL sapo", "TRL's defaults 1.0 / 1.05 (TRL computes with f32(1.05))")
    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(1411, extreme=19.5), {"loss_type": "sapo"})

    # cispo: dapo's aggregation, the weight min(r, epsilon_high): 5 (TRL's
    # recommendation) and 1.3 (the cap binds on many more tokens).
    for cap in (5.0, 1.3):
        for ga in (1, 2):
            for adv in ("row", "token"):
                seed += 1
                c = case("TRL cispo", "epsilon_high=%g GA=%d adv=%s" % (cap, ga, adv))
                trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(seed, extreme=19.5, adv=adv),
                             {"loss_type": "cispo", "epsilon_high": cap}, ga=ga)
    c = case("TRL cispo", "epsilon_high=1.3, 2 processes x GA=2 (per-rank losses)")
    trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(1420, extreme=19.5),
                 {"loss_type": "cispo", "epsilon_high": 1.3}, ga=2, ranks=2)

    # importance_sampling_level "sequence" (GSPO): TRL differentiates through
    # the row mean of the log-ratio, psft uses s_i per token; the same step
    # with one advantage per row (TRL's (B,) advantages). The last row has
    # per-token advantages ([B, T], which TRL also accepts): there TRL's
    # token t gets s_i / n_i x sum over the row's tokens of dl/ds, psft's
    # (verl's GSPO-token) only its own token's term: an intended difference
    # (docs/objectives.md), the losses still equal.
    tau = {"sapo_temperature_neg": TRL_SAPO_TAU_NEG_F32}
    sequence = [
        ("grpo", {"epsilon": 3e-4, "epsilon_high": 4e-4}, 1, "row"),
        ("grpo", {"epsilon_high": 0.28}, 2, "row"),
        ("grpo", {"epsilon_high": 0.28, "delta": 1.5}, 1, "row"),
        ("bnpo", {"epsilon_high": 0.28}, 1, "row"),
        ("dr_grpo", {"epsilon_high": 0.28, "max_completion_length": 32}, 1, "row"),
        ("dapo", {"epsilon_high": 0.28}, 2, "row"),
        ("sapo", tau, 1, "row"),
        ("sapo", tau, 2, "row"),
        ("cispo", {"epsilon_high": 1.3}, 1, "row"),
        ("cispo", {"epsilon_high": 5.0}, 2, "row"),
        ("grpo", {"epsilon_high": 0.28}, 1, "token"),
    ]
    for loss_type, extra, ga, adv in sequence:
        seed += 1
        settings = dict(extra, loss_type=loss_type, importance_sampling_level="sequence")
        shown = ["%s=%g" % (k, v) for k, v in sorted(extra.items())
                 if k != "sapo_temperature_neg"]
        c = case("TRL sequence", " ".join([loss_type] + shown + [
            "GA=%d" % ga, "adv=[B, T]" if adv == "token" else "adv=[B]"]))
        differs = None
        if adv == "token":
            differs = ("per-token advantages at sequence level: TRL's gradient goes through the "
                       "row mean, psft's (verl's GSPO-token) is each token's own term; TRL's "
                       "trainer passes one advantage per row, where they agree")
        trl_grpo_run(ext, GRPOTrainer, c, policy_inputs(seed, extreme=19.5, adv=adv), settings,
                     ga=ga, grad_differs=differs)

    # beta != 0: TRL adds beta (e^(ref - logp) - (ref - logp) - 1) per token
    # before aggregating; psft adds beta kl_penalty(K3Unclamped), same options.
    with_beta = [
        ("grpo", {"epsilon_high": 0.28}, 0.04, 1, 1, "row"),
        ("grpo", {"epsilon_high": 0.28, "importance_sampling_level": "sequence"}, 0.04, 2, 1,
         "row"),
        ("bnpo", {"epsilon_high": 0.28}, 0.1, 2, 1, "token"),
        ("dr_grpo", {"epsilon_high": 0.28, "max_completion_length": 32}, 0.1, 1, 1, "row"),
        ("dapo", {"epsilon_high": 0.28}, 0.04, 2, 2, "row"),
        ("sapo", {"sapo_temperature_neg": TRL_SAPO_TAU_NEG_F32}, 0.04, 1, 1, "token"),
        ("cispo", {"epsilon_high": 5.0}, 0.1, 2, 1, "row"),
    ]
    for loss_type, extra, beta, ga, ranks, adv in with_beta:
        seed += 1
        inputs = policy_inputs(seed, extreme=19.5, adv=adv)
        ref = trl_ref_logps(seed + 50, inputs[0])
        settings = dict(extra, loss_type=loss_type)
        level = extra.get("importance_sampling_level", "token")
        c = case("TRL beta", "%s beta=%g %s GA=%d ranks=%d adv=%s"
                 % (loss_type, beta, level, ga, ranks, adv))
        trl_grpo_run(ext, GRPOTrainer, c, inputs, settings, ga=ga, ranks=ranks, beta=beta,
                     ref=ref)

    # Spot checks: psft on float32 / bf16 inputs against TRL in float64.
    spots = [
        ("sapo", {"loss_type": "sapo"}, 0.0),
        ("cispo epsilon_high=1.3", {"loss_type": "cispo", "epsilon_high": 1.3}, 0.0),
        ("grpo sequence", {"loss_type": "grpo", "epsilon_high": 0.28,
                           "importance_sampling_level": "sequence"}, 0.0),
        ("grpo beta=0.04", {"loss_type": "grpo", "epsilon_high": 0.28}, 0.04),
    ]
    for dtype, loss_tol, grad_tol in ((torch.float32, 2e-6, 2e-6),
                                      (torch.bfloat16, 2e-5, 2.0**-7)):
        name = str(dtype).replace("torch.", "")
        for row, settings, beta in spots:
            logp, old, adv, mask = policy_inputs(1480, extreme=SPOT_EXTREME, dtype=dtype)
            ref = trl_ref_logps(1481, logp, extreme=SPOT_EXTREME) if beta else None
            m = mask.to(torch.long)
            num_items = trl_num_items(settings["loss_type"], m)
            c = case("TRL %s" % name, row)
            x_psft = leaf(logp)
            mine = ext.trl_grpo_loss(x_psft, old, adv, m, settings,
                                     None if num_items is None else float(num_items), 1, ref, beta)
            x_trl = leaf(logp.to(torch.float64))
            peer = trl_grpo_call(GRPOTrainer, trl_grpo_fake(settings, 1, beta), x_trl,
                                 old.to(torch.float64), adv.to(torch.float64), m, num_items,
                                 None if ref is None else ref.to(torch.float64))
            c.compare("loss", "loss", mine["loss"], peer, loss_tol)
            c.compare("grad", "grad", grad_of(mine["loss"], x_psft), grad_of(peer, x_trl),
                      grad_tol)
            c.note("psft %s vs TRL float64" % name)


# ---------------------------------------------------------------------------
# TRL SFT


def trl_sft_fake(settings):
    args = Strict("args", loss_type=settings.get("loss_type", "nll"),
                  average_tokens_across_devices=settings.get("average_tokens_across_devices",
                                                             True))
    return Strict(
        "SFTTrainer",
        args=args,
        model=Strict("model", training=True),
        aux_loss_enabled=False,
        compute_loss_func=None,
        label_smoother=None,
        accelerator=IdentityAccelerator(settings.get("num_processes", 1)),
        get_tp_size=lambda: 1,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def trl_sft_call(SFTTrainer, FusedCausalLMOutput, settings, log_probs, label_mask, entropy,
                 num_items):
    """SFTTrainer.compute_loss with a model whose fused forward returns the given fields."""

    def forward(**kwargs):
        assert kwargs.get("fused_lm_head") is True
        return FusedCausalLMOutput(log_probs=log_probs, label_mask=label_mask, entropy=entropy,
                                   is_top1=torch.zeros_like(label_mask))

    fake = trl_sft_fake(settings)
    rows, cols = label_mask.shape
    inputs = {"input_ids": torch.zeros(rows, cols, dtype=torch.long),
              "attention_mask": torch.ones(rows, cols, dtype=torch.long),
              "labels": torch.zeros(rows, cols, dtype=torch.long)}
    loss = SFTTrainer.compute_loss(fake, forward, inputs, num_items_in_batch=num_items)
    return loss, fake._metrics["train"]


def trl_sft_cases(ext, SFTTrainer, FusedCausalLMOutput, trl_utils):
    variants = [
        ("no num_items", None, {}),
        ("num_items (2 micro-batches)", "two", {}),
        ("num_items, 2 processes, average_tokens_across_devices", "two",
         {"num_processes": 2}),
        ("num_items, 2 processes, no averaging", "two",
         {"num_processes": 2, "average_tokens_across_devices": False}),
    ]
    for loss_type in ("nll", "dft"):
        for name, items, extra in variants:
            # Log-probabilities <= 0 (policy_inputs' old_logp), padded and empty rows.
            _, logp, _, mask = policy_inputs(1000)
            settings = dict(extra, loss_type=loss_type)
            c = case("TRL SFT", "%s %s" % (loss_type, name))
            parts = torch.arange(logp.shape[0]).chunk(2) if items == "two" else [
                torch.arange(logp.shape[0])]
            num_items = int(mask.sum()) * (2 if extra.get("num_processes") == 2 else 1) \
                if items == "two" else None
            for i, rows in enumerate(parts):
                x_psft, x_trl = leaf(logp[rows]), leaf(logp[rows])
                m = mask[rows]
                mine = ext.trl_sft_loss(x_psft, m, settings,
                                        None if num_items is None else float(num_items))
                peer, _ = trl_sft_call(SFTTrainer, FusedCausalLMOutput, settings,
                                       torch.where(m, x_trl, torch.zeros_like(x_trl)), m,
                                       torch.zeros_like(x_trl),
                                       None if num_items is None else torch.tensor(num_items))
                c.compare("loss", "part %d" % i, mine["loss"], peer, F64_TOL)
                c.compare("grad", "part %d grad" % i, grad_of(mine["loss"], x_psft),
                          grad_of(peer, x_trl), F64_TOL)

    # From logits: TRL's own selective_log_softmax and entropy_from_logits
    # feed the fake forward; psft::sft_loss_from_logits on the same logits.
    for loss_type in ("nll", "dft"):
        for items in (None, 60):
            logits, labels = logits_inputs(1010)
            scored = labels != -100
            settings = {"loss_type": loss_type}
            c = case("TRL SFT", "%s from logits num_items=%s" % (loss_type, items))
            x_psft, x_trl = leaf(logits), leaf(logits)
            mine = ext.trl_sft_loss_from_logits(x_psft, labels, settings,
                                                None if items is None else float(items))
            log_probs = trl_utils.selective_log_softmax(x_trl, labels.clamp(min=0))
            log_probs = log_probs.masked_fill(~scored, 0.0)
            with torch.no_grad():
                entropy = trl_utils.entropy_from_logits(x_trl).masked_fill(~scored, 0.0)
            peer, metrics = trl_sft_call(SFTTrainer, FusedCausalLMOutput, settings, log_probs,
                                         scored, entropy,
                                         None if items is None else torch.tensor(items))
            c.compare("loss", "loss", mine["loss"], peer, F64_TOL)
            c.compare("grad", "grad wrt logits", grad_of(mine["loss"], x_psft),
                      grad_of(peer, x_trl), F64_TOL)
            psft_entropy = (mine["entropy"] * scored).sum() / scored.sum()
            c.compare("metrics", "entropy", psft_entropy, metrics["entropy"][-1], F64_TOL)
            c.compare("metrics", "logp", mine["logp"][scored], log_probs[scored], F64_TOL)


class TinyCausalLM(torch.nn.Module):
    """The least a model needs for TRL's add_fused_lm_head: a backbone whose
    output has last_hidden_state (here an embedding lookup), an output
    embedding and a config."""

    def __init__(self, vocab, hidden, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.7)
        text_config = types.SimpleNamespace()
        self.config = types.SimpleNamespace(get_text_config=lambda: text_config)
        model = self

        class Backbone(torch.nn.Module):
            def forward(self, input_ids, **kwargs):
                return types.SimpleNamespace(last_hidden_state=model.embed[input_ids])

        self.base_model = Backbone()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        return types.SimpleNamespace(logits=self.lm_head(self.embed[input_ids]))


def trl_sft_fused_head_cases(ext, SFTTrainer, trl_utils):
    """float32 spot check through TRL's real fused LM head (add_fused_lm_head
    with SFTTrainer's outputs, ChunkedLogProbFunction's torch path on the
    CPU, float32 accumulation) against psft::sft_loss_from_logits on the same
    float32 logits; labels shifted for psft as the fused head shifts them."""
    for loss_type in ("nll", "dft"):
        for items in (None, 40):
            rows, cols, vocab, hidden = 4, 12, 64, 16
            model = TinyCausalLM(vocab, hidden, 1100)
            reference = TinyCausalLM(vocab, hidden, 1100)
            trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
            g = torch.Generator().manual_seed(1101)
            input_ids = torch.randint(0, vocab, (rows, cols), generator=g)
            labels = input_ids.clone()
            labels[:, :3] = -100  # prompt
            labels[1, 8:] = -100  # padding
            settings = {"loss_type": loss_type}
            fake = trl_sft_fake(settings)
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                      "labels": labels}
            peer = SFTTrainer.compute_loss(fake, model, inputs,
                                           num_items_in_batch=None if items is None
                                           else torch.tensor(items))
            peer.backward()
            logits = reference.forward(input_ids).logits[:, :-1]
            mine = ext.trl_sft_loss_from_logits(logits, labels[:, 1:], settings,
                                                None if items is None else float(items))
            mine["loss"].backward()
            c = case("TRL SFT f32", "%s real fused LM head num_items=%s" % (loss_type, items))
            c.compare("loss", "loss", mine["loss"], peer, 2e-6)
            c.compare("grad", "grad wrt lm_head", reference.lm_head.weight.grad,
                      model.lm_head.weight.grad, 1e-5)
            c.compare("grad", "grad wrt embeddings", reference.embed.grad, model.embed.grad, 1e-5)
            scored = labels[:, 1:] != -100
            psft_entropy = (mine["entropy"] * scored).sum() / scored.sum()
            c.compare("metrics", "entropy", psft_entropy, fake._metrics["train"]["entropy"][-1],
                      2e-6)
            c.note("psft float32 vs TRL's float32 kernel")


# ---------------------------------------------------------------------------


def print_summary(elapsed):
    header = "%-14s %-62s %10s %10s %10s %8s  %s" % ("group", "case", "loss", "grad", "metrics",
                                                      "rel/tol", "result")
    print()
    print("max |psft - peer| of loss, gradient and metrics per case (- : not compared);")
    print("rel/tol: the largest relative difference as a fraction of its tolerance")
    print(header)
    print("-" * len(header))
    for c in CASES:
        cells = ["%10.2e" % c.diff[k] if c.compared[k] else "%10s" % "-"
                 for k in ("loss", "grad", "metrics")]
        result = "FAIL" if c.failures else "ok"
        if c.notes and not c.failures:
            result += " (" + "; ".join(c.notes) + ")"
        print("%-14s %-62s %s %s %s %8.1e  %s" % (c.group, c.name[:62], cells[0], cells[1],
                                                  cells[2], c.worst, result))
    print()
    groups = {}
    for c in CASES:
        g = groups.setdefault(c.group, [0, 0.0, 0.0, 0.0])
        g[0] += 1
        g[1] = max(g[1], c.diff["loss"])
        g[2] = max(g[2], c.diff["grad"])
        g[3] = max(g[3], c.diff["metrics"])
    print("%-14s %6s %10s %10s %10s" % ("group", "cases", "loss", "grad", "metrics"))
    for name, (n, dl, dg, dm) in groups.items():
        print("%-14s %6d %10.2e %10.2e %10.2e" % (name, n, dl, dg, dm))
    failed = [c for c in CASES if c.failures]
    print()
    for c in failed:
        print("FAIL %s / %s" % (c.group, c.name))
        for f in c.failures:
            print("    " + f)
    log("%d cases, %d failed, %.1f s" % (len(CASES), len(failed), elapsed))
    return not failed


def main():
    import importlib.metadata as md

    ext = build_extension()
    t = time.time()
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as verl_F
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.sft_trainer import SFTTrainer
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import FusedCausalLMOutput

    log("imported verl %s and trl %s (transformers %s, torch %s) in %.1f s"
        % (md.version("verl"), md.version("trl"), md.version("transformers"), torch.__version__,
           time.time() - t))
    log("stand-ins in %s; names bound by the imports: %s"
        % (STANDIN_DIR, ", ".join(sorted(set(standins.BINDINGS))) or "none"))

    groups = [
        ("verl policy loss and agg_loss", lambda: verl_cases(ext, core_algos)),
        ("verl gspo, cispo, sapo", lambda: verl_objective_cases(ext, core_algos)),
        ("verl kl_penalty", lambda: verl_kl_cases(ext, core_algos, verl_F)),
        ("verl logits", lambda: verl_logits_cases(ext, verl_F, core_algos)),
        ("verl spot checks", lambda: verl_spot_checks(ext, core_algos)),
        ("TRL GRPO", lambda: trl_grpo_cases(ext, GRPOTrainer)),
        ("TRL sapo, cispo, sequence, beta", lambda: trl_objective_cases(ext, GRPOTrainer)),
        ("TRL SFT", lambda: trl_sft_cases(ext, SFTTrainer, FusedCausalLMOutput, trl_utils)),
        ("TRL SFT fused head", lambda: trl_sft_fused_head_cases(ext, SFTTrainer, trl_utils)),
    ]
    crashed = []
    for name, run in groups:
        try:
            run()
        except Exception as e:  # a crash in one group still reports the others
            import traceback

            traceback.print_exc()
            crashed.append("%s: %s: %s" % (name, type(e).__name__, e))

    ok = print_summary(time.time() - START)
    if standins.USES:
        ok = False
        print("FAIL a stand-in was used (the numbers above may not be the peers'):")
        for what, name, where in standins.USES:
            print("    %s %s at %s" % (name, what, where))
    else:
        log("no stand-in was used (%d names bound, none called or read)"
            % len(set(standins.BINDINGS)))
    for line in crashed:
        ok = False
        print("FAIL crashed: " + line)
    log("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
