"""Direct Preference Optimization's loss (Rafailov et al. 2023), from the log-probabilities of whole completions.

A preference pair is one prompt x with a completion people preferred, y_w (chosen), and one they did not, y_l
(rejected). DPO trains the policy pi against a frozen reference model pi_ref (the model fine-tuning started from)
with no reward model and no sampling:

    r(x, y)  = beta * (log pi(y | x) - log pi_ref(y | x))          the implicit reward of a completion
    loss     = -log sigmoid(r(x, y_w) - r(x, y_l))                  per pair

log pi(y | x) is the sum of the log-probabilities of the completion's tokens (its end token included), the tokens
sft trains on. Label smoothing eps (conservative DPO: a preference label is wrong with probability eps) makes it
-(1 - eps) log sigmoid(m) - eps log sigmoid(-m) for the margin m = r_w - r_l. At the start, policy = reference,
every reward is 0 and every pair's loss is log 2.

The other preference losses (train.preference_loss; `PreferenceLoss` computes each from the same log-probabilities),
with m = beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))), DPO's margin, and a_w, a_l the
mean per-token log-probability of each completion under the policy (its sum over its token count):

    dpo      -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)                              (above)
    robust   (-(1 - eps) log sigmoid(m) + eps log sigmoid(-m)) / (1 - 2 eps)    an unbiased loss under label noise eps
                                                                                (Chowdhury et al. 2024)
    hinge    max(0, 1 - m)                                                      SLiC (Zhao et al. 2023)
    ipo      (d - 1 / (2 beta))^2, d the per-token mean log-ratios' difference  IPO (Azar et al. 2023): the margin
             ((log pi(y_w) - log pi_ref(y_w)) / |y_w| - (same for y_l) / |y_l|)  is held at 1/(2 beta), never pushed
                                                                                to infinity
    dpo_norm -log sigmoid(beta d), d as IPO's                                  DPO on per-token log-ratios (TRL's
                                                                                sigmoid_norm)
    exo      q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps), q = sigmoid(m)  EXO (Ji et al. 2024): the reverse KL
                                                                                from the smoothed label (eps > 0)
    nca      -log sigmoid(r_w) - log sigmoid(-r_w) / 2 - log sigmoid(-r_l) / 2  NCA (Chen et al. 2024), r_w, r_l each
                                                                                completion's own reward
    bco      -log sigmoid(r_w) - log sigmoid(-r_l)                              BCO's paired form (Jung et al. 2024,
                                                                                without its running reward mean)
    sppo_hard (r_w / beta - 1 / (2 beta))^2 + (r_l / beta + 1 / (2 beta))^2     SPPO (Wu et al. 2024) with hard
                                                                                win probabilities 1 and 0
    apo_zero 1 - sigmoid(r_w) + sigmoid(r_l)                                    APO (D'Oosterlinck et al. 2024): the
                                                                                chosen up, the rejected down
    apo_down sigmoid(r_w) + 1 - sigmoid(m)                                      APO for chosen completions worse than
                                                                                the model's own: both down
    simpo    -(1 - eps) log sigmoid(beta (a_w - a_l) - gamma) - eps log sigmoid(...)   SimPO (Meng et al. 2024): no
                                                                                reference, a target margin gamma
    orpo     -a_w - beta log sigmoid(log odds(y_w) - log odds(y_l)),           ORPO (Hong et al. 2024): no reference;
             odds(y) = p / (1 - p) of p = exp(a)                                next-token training on the chosen
                                                                                completion plus an odds-ratio term

Any of them but orpo (which has its own) can add alpha (-log pi(y_w) / |y_w|), a next-token term on the chosen
completion (nll_weight, train.preference_nll_weight: RPO, Pang et al. 2024; TRL's "sft" loss type beside another).

Unpaired preference data (`lmforge prepare --task unpaired`: one completion y of a prompt x, labelled desirable or
undesirable, with no second completion) trains with a loss of each completion alone, r = beta * (log pi(y | x) -
log pi_ref(y | x)) its reward and lambda_D, lambda_U the weights of the two kinds (unpaired_loss):

    kto      desirable: lambda_D (1 - sigmoid(r - beta z)), undesirable: lambda_U (1 - sigmoid(beta z - r))
             KTO (Ethayarajh et al. 2024): z, the reference point, estimates the KL divergence of the policy from
             the reference, the mean of log pi(y' | x) - log pi_ref(y' | x) over mismatched rows (each prompt with
             another example's completion: data.batches.unpaired_batch), clamped at 0 and never differentiated
    apo_zero_unpaired  desirable: lambda_D (1 - sigmoid(r)), undesirable: lambda_U sigmoid(r)   APO-zero per
             completion (TRL's KTOTrainer loss type of that name): no reference point
    bco_unpaired  desirable: -lambda_D log sigmoid(r - delta), undesirable: -lambda_U log sigmoid(-(r - delta))
             BCO (Jung et al. 2024, Binary Classifier Optimization; TRL's BCOTrainer without its optional density
             ratio): a logistic classifier of the two kinds on the reward, delta the running mean of every reward
             trained on so far (RunningMean: every micro-batch's, over all processes, before its loss; kept in the
             checkpoint); an evaluation takes the mean reward of the completions it evaluates

the first two TRL's KTOTrainer loss types; the loss of a batch is the mean over its completions, as TRL's.

A reward model (train.objective reward; reward_model_loss) learns from the same pairs with no reference and no
log-probabilities: a scalar head reads each whole example (prompt, completion, end token), r(x, y) its output, and

    reward   -log sigmoid(r(x, y_w) - r(x, y_l) - m) + c (r(x, y_w) + r(x, y_l))^2     Bradley-Terry, as InstructGPT
             (Ouyang et al. 2022) and TRL's RewardTrainer; c (train.reward_center_coefficient) keeps rewards
             centred on 0 (Eisenstein et al. 2023); m the pair's margin when the data has one (Llama 2's
             preference-strength margin, TRL's "margin" column), else 0

Group Relative Policy Optimization (grpo; Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer) is online only
(train.online_reward_model or online_reward_function): the policy samples G completions o_1..o_G of each prompt,
the reward model (or function) scores them r_1..r_G, and each completion's advantage is its reward against its
group's (group_advantages):

    A_i      = (r_i - mean(r)) / (std(r) + 1e-4)        or r_i - mean(r) unscaled (Dr. GRPO, Liu et al. 2025)
    l_i,t    = -min(w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t,   w = pi(o_i,t) / pi_old(o_i,t)
    KL_t     = exp(d) - d - 1,  d = log pi_ref(o_i,t) - log pi(o_i,t)
               (grpo_token_loss; KL_t is Schulman's k3 estimate). pi_old is the policy that sampled: with one update
               per generation (train.grpo_iterations 1) it is the policy itself, so w is 1 with the gradient of log
               pi and PPO's clip never bites; with mu updates per generation (DeepSeekMath's mu, TRL's
               num_iterations) the samples' log-probabilities at sampling time are kept and from the second update
               on w moves and the clip holds each token within its range (eps_high > eps_low: DAPO's clip-higher).
               delta (two-sided clipping, TRL's) also caps w for negative advantages. GSPO (Zheng et al. 2025;
               grpo_importance_sampling sequence) uses one w per completion, exp of its tokens' mean log-ratio.
and grpo_objective puts another weight in PPO's clip's place:
    cispo    l_i,t = -sg(min(w, 1 + eps_high)) A_i log pi(o_i,t) + beta KL_t   (CISPO, MiniMax-M1 2025; TRL's loss_type
               cispo with epsilon_high = 1 + eps_high): the capped weight is a constant (sg: no gradient), so a token
               past the cap still learns, at the capped rate, where PPO's clip drops it
    sapo     l_i,t = -(4 / tau) sigmoid(tau (w - 1)) A_i + beta KL_t   (SAPO, Gao et al. 2025; TRL's): a soft gate in
               place of the hard clip, tau = tau_pos for A_i > 0 and tau_neg otherwise
With one update per generation (w = 1) all three have the gradient of -A_i log pi. grpo_top_entropy rho keeps the
policy term of only the tokens whose entropy is in the top rho of their micro-batch's completion tokens on all
processes (Wang et al. 2025, "Beyond the 80/20 rule"; TRL's top_entropy_quantile; high_entropy_mask); the others
keep their KL term and their place in the count below.

The tokens' losses are summed and divided (grpo_sequence_loss and the trainer's count) by each completion's
length and the number of completions (grpo), by the batch's completion tokens (dapo: DAPO, Yu et al. 2025; TRL's
default) or by max_new_tokens and the number of completions (dr_grpo). beta 0 keeps no reference (TRL's default).

Rewards (what reward accuracy and margin are measured on): beta times the log-ratio to the reference for the
reference losses, beta times a_w and a_l for simpo and orpo (as TRL's DPO, CPO and ORPO trainers log them).
The formulas from dpo_norm to apo_down are TRL's DPOTrainer loss types of the same names (sigmoid_norm, exo_pair,
nca_pair, bco_pair, ...). IPO's length normalisation is TRL's (its authors' own choice); ORPO's next-token term
averages each chosen completion's tokens, then the pairs (the paper's; TRL's ORPOTrainer averages the batch's
chosen tokens at once, the same with batches of one pair).

Imports only torch: the trainer trains on it and `lmforge eval` measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORED = -100  # the label of a position that is not part of the completion (prompt, padding)
LOSSES = ("dpo", "robust", "hinge", "ipo", "dpo_norm", "exo", "nca", "bco", "sppo_hard", "apo_zero", "apo_down",
          "simpo", "orpo")
UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco_unpaired")  # losses of single completions (unpaired data)
REFERENCE_FREE = frozenset({"simpo", "orpo"})  # losses of the policy alone: no reference model is kept or run
SMOOTHED = frozenset({"dpo", "robust", "exo", "simpo"})  # losses that take a label smoothing eps
GROUP_LOSSES = ("grpo",)  # online losses of groups of the policy's own samples, scored by a reward model
GRPO_NORMS = ("dapo", "grpo", "dr_grpo")  # what GRPO's summed token losses are divided by (module docstring)
GRPO_OBJECTIVES = ("clip", "cispo", "sapo")  # how GRPO weighs a token by its ratio pi / pi_old (module docstring)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32: each label's log-probability, 0 where the label is -100.

    logits: (B, T, V) any float dtype (log-softmax in fp32); labels: (B, T) long, the next token of each position.
    """
    return -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORED, reduction="none")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: each row's summed log-probability of its labels that are not -100 (label_logprobs' rows)."""
    return label_logprobs(logits, labels).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward), each (P,) fp32, from the completions' log-probabilities
    (each (P,)) under the policy and the reference: the formulas of the module docstring."""
    chosen = beta * (policy_chosen.float() - reference_chosen.float())
    rejected = beta * (policy_rejected.float() - reference_rejected.float())
    margin = chosen - rejected
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, chosen.detach(), rejected.detach()


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0,
                      margin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(P,) fp32 loss per pair of a reward model from its rewards of the chosen and the rejected completions (each
    (P,)): -log sigmoid(r_w - r_l - m) + center (r_w + r_l)^2 (module docstring), m each pair's margin (P,) or 0.
    Their mean over the pairs is TRL's RewardTrainer loss (its center_rewards_coefficient term is a mean over the
    pairs too; its "margin" column is m)."""
    chosen, rejected = chosen.float(), rejected.float()
    loss = -F.logsigmoid(chosen - rejected - (margin.float() if margin is not None else 0.0))
    return loss + center * (chosen + rejected) ** 2 if center else loss


def reference_point(log_ratio_sum: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z from the sum of the mismatched rows' log-ratios log pi(y' | x) - log pi_ref(y' | x)
    and their number: their mean, clamped at 0 (it estimates a KL divergence, never negative), detached, fp32."""
    return (log_ratio_sum.detach().double() / rows.double().clamp(min=1)).clamp(min=0).float()


def kto_weight_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
                      ) -> Optional[str]:
    """A warning when KTO's weights do not balance the two kinds of completions as its paper advises (its eq. 8:
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]), with the ranges of either weight that would; None when they do, or
    when one kind is missing (nothing to balance)."""
    if not desirable or not undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 - 1e-9 <= ratio <= 4.0 / 3.0 + 1e-9:
        return None
    d_low = undesirable_weight * undesirable / desirable
    u_high = desirable_weight * desirable / undesirable
    return (f"{desirable} desirable and {undesirable} undesirable train completions with kto weights "
            f"{desirable_weight:g} and {undesirable_weight:g} give lambda_D n_D / (lambda_U n_U) = {ratio:.3g}, outside "
            f"KTO's advised [1, 4/3]: set --train.kto_desirable_weight in [{_sig3(d_low, up=True)}, "
            f"{_sig3(4 * d_low / 3, up=False)}] or --train.kto_undesirable_weight in [{_sig3(3 * u_high / 4, up=True)}, "
            f"{_sig3(u_high, up=False)}]")


def _sig3(x: float, up: bool) -> str:
    """`x` (> 0) to 3 significant digits, rounded up or down: an end of an advised range printed inside it, so that
    the printed value itself keeps the rule."""
    scale = 10.0 ** (2 - math.floor(math.log10(x)))
    digits = x * scale
    rounded = math.ceil(digits - 1e-9) if up else math.floor(digits + 1e-9)
    return f"{rounded / scale:g}"


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(P, G) fp32 advantages of P groups of G samples from their rewards (P, G): each reward minus its group's mean,
    divided by the group's standard deviation (Bessel-corrected) + 1e-4 when scale (GRPO; TRL's scale_rewards
    "group"), not divided when not (Dr. GRPO; scale_rewards "none"). A group whose rewards are all equal has
    advantages 0: it teaches nothing."""
    r = rewards.float()
    advantages = r - r.mean(dim=1, keepdim=True)
    return advantages / (r.std(dim=1, keepdim=True) + 1e-4) if scale else advantages


def grpo_log_ratio(logps: torch.Tensor, old: Optional[torch.Tensor] = None,
                   sequence_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log w = log pi - log pi_old (N, T) of each token of N sampled completions (module docstring), or (N, 1) of
    each completion (GSPO: the mean over its tokens, sequence_mask (N, T) True on them). old None: the samples are
    the policy's own (one update per generation), so log w is 0 with the gradient of log pi."""
    log_ratio = logps - (logps.detach() if old is None else old.float())
    if sequence_mask is not None:
        counted = sequence_mask.to(log_ratio.dtype)
        log_ratio = (log_ratio * counted).sum(-1, keepdim=True) / counted.sum(-1, keepdim=True).clamp(min=1.0)
    return log_ratio


def grpo_token_loss(logps: torch.Tensor, advantages: torch.Tensor, reference: Optional[torch.Tensor] = None,
                    beta: float = 0.0, old: Optional[torch.Tensor] = None, epsilon: tuple[float, float] = (0.2, 0.2),
                    delta: Optional[float] = None, sequence_mask: Optional[torch.Tensor] = None,
                    objective: str = "clip", sapo_temperatures: tuple[float, float] = (1.0, 1.05),
                    keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, T) fp32 GRPO loss of each token of N sampled completions (module docstring): logps (N, T) the policy's
    log-probability of each token, advantages (N,) each completion's, reference (N, T) the reference's
    log-probabilities (needed when beta > 0), old (N, T) the sampling policy's (None: the policy itself), epsilon
    (eps_low, eps_high) the clip range, delta the cap of two-sided clipping (None: none), sequence_mask for GSPO's
    one ratio per completion (grpo_log_ratio), objective one of GRPO_OBJECTIVES (clip: PPO's; cispo: only eps_high
    is read; sapo: sapo_temperatures (tau_pos, tau_neg), no epsilon), keep (N, T) bool the tokens whose policy term
    counts (high_entropy_mask; None: all). Positions that are not completion tokens are masked by the caller."""
    logps = logps.float()
    ratio = torch.exp(grpo_log_ratio(logps, old, sequence_mask))
    a = advantages.float()[:, None]
    if objective == "cispo":
        loss = -torch.clamp(ratio, max=1.0 + epsilon[1]).detach() * a * logps
    elif objective == "sapo":
        tau = torch.where(a > 0, sapo_temperatures[0], sapo_temperatures[1])
        loss = (-torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * a).expand_as(logps)
    elif objective == "clip":
        clipped = torch.clamp(ratio, 1.0 - epsilon[0], 1.0 + epsilon[1])
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        loss = -torch.minimum(ratio * a, clipped * a).expand_as(logps)
    else:
        raise ValueError(f"unknown GRPO objective {objective!r}: one of {', '.join(GRPO_OBJECTIVES)}")
    if keep is not None:
        loss = loss * keep
    if beta:
        d = reference.detach().float() - logps
        loss = loss + beta * (torch.exp(d) - d - 1.0)
    return loss


def grpo_clipped(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: tuple[float, float],
                 objective: str = "clip") -> torch.Tensor:
    """Where the clip bites (bool, the shape of ratio): the ratio is past 1 + eps_high with a positive advantage or
    (clip only) below 1 - eps_low with a negative one. PPO's clip (TRL's clip_ratio) then adds no gradient from the
    token (or GSPO's completion); CISPO's (TRL's cispo_clip_ratio) caps its weight."""
    a = advantages[:, None]
    high = (ratio > 1.0 + epsilon[1]) & (a > 0)
    return high if objective == "cispo" else high | ((ratio < 1.0 - epsilon[0]) & (a < 0))


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, rho: float,
                      everyone: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, T) bool: the completion tokens (mask True) whose entropy is at least the (1 - rho) quantile (linear
    interpolation, torch.quantile's) of every completion token's entropy, `everyone` (M,) when given (all
    processes' tokens, this one's included), else entropies[mask]: the top rho of them (TRL's get_high_entropy_mask;
    rho 0 keeps the highest only). No completion token anywhere: none."""
    pool = entropies[mask].float() if everyone is None else everyone.float()
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pool.to(entropies.device), 1.0 - rho)
    return (entropies.float() >= threshold) & mask


def grpo_sequence_loss(token_loss: torch.Tensor, mask: torch.Tensor, norm: str, max_new_tokens: int) -> torch.Tensor:
    """(N,) each completion's share of the GRPO loss from its tokens' (N, T) and their mask (N, T) (True on the
    completion's tokens): the sum divided by its length (grpo), by max_new_tokens (dr_grpo) or not at all (dapo);
    the trainer then divides the batch's sum by its completions (grpo, dr_grpo) or completion tokens (dapo)."""
    summed = (token_loss * mask).sum(dim=-1)
    if norm == "grpo":
        return summed / mask.sum(dim=-1).clamp(min=1)
    if norm == "dr_grpo":
        return summed / max_new_tokens
    if norm == "dapo":
        return summed
    raise ValueError(f"unknown GRPO normalisation {norm!r}: one of {', '.join(GRPO_NORMS)}")


@dataclass
class RunningMean:
    """BCO's delta: the mean of every reward seen so far, updated a batch at a time (TRL's RunningMoments' mean: the
    count starts at 1e-24, so the first batch's mean is taken whole)."""

    mean: float = 0.0
    count: float = 1e-24

    def update(self, total: float, n: float) -> float:
        """Take a batch of n rewards summing to total; return the new mean."""
        if n > 0:
            self.count += n
            self.mean += (total / n - self.mean) * n / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for large |x| (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class PreferenceLoss:
    """One of LOSSES with its settings (the module docstring): called on a batch of P pairs' completion
    log-probabilities, it gives (loss per pair, chosen reward, rejected reward), each (P,) fp32."""

    kind: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma
    nll_weight: float = 0.0  # alpha: + alpha x the chosen completion's mean negative log-probability per token
    desirable_weight: float = 1.0  # lambda_D of the unpaired losses
    undesirable_weight: float = 1.0  # lambda_U of the unpaired losses

    def __post_init__(self) -> None:
        known = LOSSES + UNPAIRED_LOSSES + GROUP_LOSSES
        if self.kind not in known:
            raise ValueError(f"unknown preference loss {self.kind!r}: one of {', '.join(known)}")
        if self.nll_weight and self.unpaired:
            raise ValueError(f"{self.kind} trains on single completions: an nll weight on a pair's chosen completion "
                             "has none to apply to")
        if self.nll_weight and self.kind == "orpo":
            raise ValueError("orpo has its own next-token term on the chosen completion: an nll weight would add a "
                             "second one")
        if self.kind == "exo" and not 0.0 < self.label_smoothing < 0.5:
            raise ValueError("exo is the KL divergence from a smoothed label: it needs a label smoothing in (0, 0.5) "
                             "(train.dpo_label_smoothing; the paper's 1e-3)")

    @classmethod
    def of(cls, train: Any) -> "PreferenceLoss":
        """The loss a run's train config (train.preference_loss, dpo_beta, dpo_label_smoothing, simpo_gamma,
        preference_nll_weight; grpo_beta for grpo, its beta) sets."""
        beta = train.grpo_beta if train.preference_loss in GROUP_LOSSES else train.dpo_beta
        return cls(train.preference_loss, beta, train.dpo_label_smoothing, train.simpo_gamma,
                   train.preference_nll_weight, train.kto_desirable_weight, train.kto_undesirable_weight)

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0 if self.group else self.kind not in REFERENCE_FREE

    @property
    def group(self) -> bool:
        """A loss of groups of the policy's own samples (grpo: online only), not of the data's completions."""
        return self.kind in GROUP_LOSSES

    @property
    def unpaired(self) -> bool:
        """A loss of single completions (unpaired preference data), not of pairs."""
        return self.kind in UNPAIRED_LOSSES

    @property
    def needs_delta(self) -> bool:
        """Whether the loss needs BCO's reward threshold delta (RunningMean while training)."""
        return self.kind == "bco_unpaired"

    @property
    def needs_kl(self) -> bool:
        """Whether the loss needs KTO's reference point z (the mismatched rows' log-ratios)."""
        return self.kind == "kto"

    def unpaired_loss(self, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
                      kl: Optional[torch.Tensor] = None, delta: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reward), each (n,) fp32, of n single completions: policy / reference their summed log-probabilities
        (n,), desirable (n,) bool their labels, kl KTO's reference point z (a scalar, detached, >= 0; kto only),
        delta BCO's reward threshold (a scalar, never differentiated; bco_unpaired only)."""
        if not self.unpaired:
            raise ValueError(f"{self.kind} is a loss of pairs; unpaired data trains with "
                             f"{' or '.join(UNPAIRED_LOSSES)}")
        ratio = policy.float() - reference.float()
        if self.kind == "kto":
            z = kl.detach().float()
            good, bad = 1.0 - torch.sigmoid(self.beta * (ratio - z)), 1.0 - torch.sigmoid(self.beta * (z - ratio))
        elif self.kind == "bco_unpaired":
            margin = self.beta * ratio - torch.as_tensor(delta, dtype=torch.float32, device=ratio.device).detach()
            good, bad = -F.logsigmoid(margin), -F.logsigmoid(-margin)
        else:  # apo_zero_unpaired
            good, bad = 1.0 - torch.sigmoid(self.beta * ratio), torch.sigmoid(self.beta * ratio)
        loss = torch.where(desirable, self.desirable_weight * good, self.undesirable_weight * bad)
        return loss, self.beta * ratio.detach()

    def __call__(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, reference_chosen: Optional[torch.Tensor] = None,
                 reference_rejected: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """policy_* / reference_*: (P,) summed log-probabilities of each completion (reference_* None for the
        reference-free losses); *_tokens: (P,) how many tokens each completion has (its labels). With nll_weight
        alpha, each pair's loss also has alpha times its chosen completion's mean negative log-probability per
        token (RPO, Pang et al. 2024; TRL's "sft" loss type beside another)."""
        loss, chosen, rejected = self.pair_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens,
                                                reference_chosen, reference_rejected)
        if self.nll_weight:
            loss = loss - self.nll_weight * policy_chosen.float() / chosen_tokens.float().clamp(min=1)
        return loss, chosen, rejected

    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                  rejected_tokens: torch.Tensor, reference_chosen: Optional[torch.Tensor],
                  reference_rejected: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss of `kind` alone (the module docstring's formulas), with the rewards."""
        if self.unpaired or self.group:
            what = "single completions (unpaired preference data)" if self.unpaired else "groups of sampled completions"
            raise ValueError(f"{self.kind} is a loss of {what}, not of pairs")
        beta, eps = self.beta, self.label_smoothing
        if self.kind == "dpo":
            return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, eps)
        pc, pr = policy_chosen.float(), policy_rejected.float()
        nc, nr = chosen_tokens.float().clamp(min=1), rejected_tokens.float().clamp(min=1)
        if self.kind in REFERENCE_FREE:
            mean_c, mean_r = pc / nc, pr / nr  # a_w, a_l
            if self.kind == "simpo":
                margin = beta * (mean_c - mean_r) - self.simpo_gamma
                loss = -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
            else:  # orpo
                log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
                loss = -mean_c - beta * F.logsigmoid(log_odds)
            return loss, beta * mean_c.detach(), beta * mean_r.detach()
        ratio_c = pc - reference_chosen.float()
        ratio_r = pr - reference_rejected.float()
        margin = beta * (ratio_c - ratio_r)
        reward_c, reward_r = beta * ratio_c, beta * ratio_r
        if self.kind == "robust":
            loss = (-(1.0 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1.0 - 2.0 * eps)
        elif self.kind == "hinge":
            loss = torch.relu(1.0 - margin)
        elif self.kind == "ipo":
            loss = (ratio_c / nc - ratio_r / nr - 1.0 / (2.0 * beta)) ** 2
        elif self.kind == "dpo_norm":
            loss = -F.logsigmoid(beta * (ratio_c / nc - ratio_r / nr))
        elif self.kind == "exo":
            q = torch.sigmoid(margin)
            loss = (q * (F.logsigmoid(margin) - math.log1p(-eps))
                    + (1.0 - q) * (F.logsigmoid(-margin) - math.log(eps)))
        elif self.kind == "nca":
            loss = -F.logsigmoid(reward_c) - 0.5 * F.logsigmoid(-reward_c) - 0.5 * F.logsigmoid(-reward_r)
        elif self.kind == "bco":
            loss = -F.logsigmoid(reward_c) - F.logsigmoid(-reward_r)
        elif self.kind == "sppo_hard":
            loss = (ratio_c - 0.5 / beta) ** 2 + (ratio_r + 0.5 / beta) ** 2
        elif self.kind == "apo_zero":
            loss = 1.0 - torch.sigmoid(reward_c) + torch.sigmoid(reward_r)
        else:  # apo_down
            loss = torch.sigmoid(reward_c) + 1.0 - torch.sigmoid(margin)
        return loss, reward_c.detach(), reward_r.detach()
