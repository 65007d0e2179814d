# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.2",
#     "gymnasium[mujoco]>=1.0",
#     "mujoco>=3.0",
#     "numpy>=1.25",
#     "tyro>=0.8.4",
#     "tensorboard>=2.10",
# ]
# ///
# docs and measured results: docs/hyper_sac.md
"""SAC with a hypernetwork critic (SA-Hyper) and the paper's critic baselines.

Implements the single-task actor-critic experiments of Sarafian, Keynan & Kraus, "Recomposing the
Reinforcement Learning Building Blocks with Hypernetworks" (ICML 2021), Sec. 2-3 and 5.2, on top of
Soft Actor-Critic (Haarnoja et al. 2018). Only the Q-network model changes between runs: the
SA-Hyper critic computes Q(s, a) = f_{w(s)}(a), a small dynamic network over the action whose
weights are generated from the state by a residual primary network (paper eq. 1, Fig. 1).

    python hyper_sac.py --env-id HalfCheetah-v4                  # SA-Hyper critic (default)
    python hyper_sac.py --env-id HalfCheetah-v4 --critic mlp     # MLP-Standard baseline
    python hyper_sac.py --help                                   # every flag, with its meaning

SAC follows CleanRL's conventions (twin Q-networks with Polyak targets, tanh-squashed Gaussian actor
with bounded log-std, automatic entropy tuning), with these deliberate choices:

- One critic AND one actor update per environment step, as in the SAC paper. CleanRL delays the actor
  by 2 steps and then runs 2 actor steps, which gives the same number of actor updates.
- Critic learning rate 5e-5 for hypernetwork critics (the paper's tuned value), 3e-4 otherwise (the
  SAC paper's; CleanRL uses 1e-3). Actor and alpha 3e-4.
- One environment and an explicit reset at each episode end, so the true final observation of a
  time-limit truncation is always at hand (gymnasium 1.x's vector autoreset moved it, which breaks
  CleanRL's SAC); truncation bootstraps, termination does not.
- The tanh log-prob correction uses the exact, numerically stable form
  log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) plus log(action_scale); CleanRL adds 1e-6 inside
  a log instead.
- Deterministic evaluation with tanh(mean) on a separate environment reseeded identically at every
  evaluation (so evaluations are comparable and a resumed run evaluates exactly as an uninterrupted one).

Where the authors' released SAC code (github keynans/HypeRL, SAC/) differs, we follow the paper and
CleanRL; `--hyper-init authors --alpha 1.0 --no-autotune --learning-starts 1000` gets closest to it:

- Entropy: the authors fix alpha = 1.0 with tuning off (their comments suggest 0.2 was used); we tune
  alpha automatically towards target entropy -|A|, starting from alpha = 1.
- Their updates start at 256 transitions, during 1000 random steps; we use 5000 random steps first.
- Their deterministic evaluation uses the pre-tanh mean (clipped by the env); we use tanh(mean).
- Their log-prob has no log(action_scale) term and never adds the action bias; we do both.
- Initialization: the paper initializes the primary network so that the generated dynamic weights
  resemble, on average, Kaiming-uniform, and tunes the critic lr 5e-5 on the released code's init. The
  default `--hyper-init authors` is that init, the released constants (primary U(+-1/sqrt(2 fan_in)), heads
  U(+-0.05) and U(+-0.008)): the generated network's scale then follows the task's state scale (close to
  nn.Linear's default on HalfCheetah, about 4x smaller on Hopper). `--hyper-init pytorch` instead matches
  nn.Linear's default on every task, with the embedding scaled so that an Adam step moves the generated
  weights as far as the released constants do on HalfCheetah (derivation at `init_hypernetwork`); on
  Hopper-v4 its Q-values outgrow the MLP's and the released init's (docs/hyper_sac.md).
- Baselines: their ResNet-Features projects the 1024-d embedding to 10 dims before the MLP and several
  of their baseline classes crash as released; ours feed the full embedding (the paper's wording) and
  all run. MLP-Small / MLP-Large do not exist in their code; we build them from the paper's sizes.
Their CLI bugs, which we do not inherit, are listed in docs/hyper_sac.md.
"""

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import os
import random
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter

# Two known-harmless third-party warnings are silenced, nothing else: gymnasium's "-v4 is out of date" (v4 is kept
# on purpose, see README) and MuJoCo's C-level deprecation of `settotalmass`, still applied, in gymnasium's XML.
warnings.filterwarnings("ignore", r".*The environment \S+-v4 is out of date", DeprecationWarning, r"gymnasium\.")


def mujoco_warning(message: str) -> None:
    """MuJoCo's C-level warnings, printed as its default handler prints them, except the harmless one above."""
    if "'settotalmass' is deprecated" not in message:
        print(f"WARNING: {message}\n", file=sys.stderr, flush=True)


mujoco.set_mju_user_warning(mujoco_warning)

CriticName = Literal["sa-hyper", "as-hyper", "mlp", "mlp-small", "mlp-large", "resnet-features", "res35", "d2rl"]
HYPER_CRITICS = ("sa-hyper", "as-hyper")


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "hyper_sac"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (environment, networks, replay sampling)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` (disable with --no-torch-deterministic)"""
    cuda: bool = True
    """use CUDA when it is available (disable with --no-cuda)"""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default (all cores)"""
    track: bool = False
    """track the run with Weights and Biases (mirrors TensorBoard; needs `pip install wandb`)"""
    wandb_project_name: str = "hyperl"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team); None uses your default entity"""
    eval_freq: int = 5000
    """evaluate the deterministic policy every this many environment steps (0 disables)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    progress_freq: int = 1000
    """print a progress line (step, steps/s, ETA, returns) every this many steps"""
    save_model: bool = False
    """save the final actor and critics to runs/{run_name}/{exp_name}.cleanrl_model"""
    checkpoint_freq: int = 25000
    """write a resumable checkpoint to runs/{run_name}/checkpoint.pt every this many steps (0 disables)"""
    resume: Optional[str] = None
    """path of a checkpoint.pt to continue from; pass the same settings as the original run"""
    eval_model: Optional[str] = None
    """a saved .cleanrl_model or checkpoint.pt: skip training, evaluate its actor for --eval-episodes episodes"""
    capture_video: bool = False
    """with --eval-model: record the evaluation episodes to videos/ (headless: set MUJOCO_GL=egl or osmesa)"""

    # --- algorithm (SAC; paper Sec. 5: the baseline's hyperparameters, only the critic changes) ---
    env_id: str = "HalfCheetah-v4"
    """the gymnasium environment id (any env with a Box action space)"""
    total_timesteps: int = 1000000
    """total environment steps of the run"""
    buffer_size: int = 1000000
    """replay buffer capacity (transitions)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging coefficient of the target critics"""
    batch_size: int = 256
    """minibatch size of each update"""
    learning_starts: int = 5000
    """uniform-random actions for this many steps before learning starts"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: Optional[float] = None
    """critic learning rate; default 5e-5 for hypernetwork critics (paper) and 3e-4 otherwise (SAC paper)"""
    alpha: float = 1.0
    """entropy coefficient: fixed value with --no-autotune, initial value with autotune"""
    autotune: bool = True
    """tune alpha automatically towards target entropy -|A| (disable with --no-autotune)"""
    alpha_lr: float = 3e-4
    """learning rate of log(alpha) when autotuning"""
    reuse_critic_weights: bool = False
    """sa-hyper only: the actor loss reuses the critic step's generated weights (faster; changes the update order)"""

    # --- model ---
    critic: CriticName = "sa-hyper"
    """Q-network: sa-hyper (paper), as-hyper, mlp (2x256), mlp-small, mlp-large, resnet-features, res35, d2rl"""
    hyper_embedding_dim: int = 1024
    """width of the primary network's output embedding; its stages are dim/4, dim/2, dim (paper: 256, 512, 1024)"""
    hyper_blocks: int = 2
    """residual blocks per stage of the primary network (paper: 2)"""
    hyper_dynamic_hidden: int = 256
    """hidden units of the single hidden layer of the dynamic network (paper: 256)"""
    hyper_init: Literal["authors", "pytorch"] = "authors"
    """authors: the released code's constants, with which the paper's critic lr was tuned; pytorch: generated
    weights and biases like nn.Linear's default init on the first states, on every task"""
    hyper_embedding_norm: float = 8.0
    """with --hyper-init pytorch: rms norm of the embedding on the first states; sets how far an Adam step moves
    the generated weights (8: as far as with the released constants)"""
    hyper_weight_scale: float = 1.0
    """with --hyper-init pytorch: generated weights and biases start at this multiple of nn.Linear's default scale
    on the first states (1: nn.Linear's)"""
    hyper_init_samples: int = 1000
    """meta-variable samples (random-action states, or random actions for as-hyper) used by --hyper-init pytorch"""
    mlp_large_width: int = 2900
    """hidden width of both layers of mlp-large (paper: 2900, about 9M weights)"""
    res35_blocks: int = 35
    """residual blocks of res35 (paper: 35, about 4.5M weights)"""


def make_env(env_id: str, render_mode: Optional[str] = None) -> gym.Env:
    try:
        env = gym.make(env_id, **({"render_mode": render_mode} if render_mode else {}))
    except Exception as e:  # unknown id, missing dependency, bad kwargs: all end the run the same way
        fail(f"cannot make environment {env_id!r}: {type(e).__name__}: {e}")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{env_id} has a {type(env.action_space).__name__} action space; SAC needs a continuous Box action space")
    if len(env.action_space.shape) != 1:
        fail(f"{env_id} has a {env.action_space.shape}-shaped action space; SAC needs a flat (1-D) Box action space")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        fail(f"{env_id} must have a flat Box observation space, got {env.observation_space}")
    if not np.all(np.isfinite(env.action_space.low)) or not np.all(np.isfinite(env.action_space.high)):
        fail(f"{env_id} has an unbounded action space; a tanh-squashed actor needs finite bounds")
    return env


# ALGO LOGIC: networks, smallest piece first.
class ResBlock(nn.Module):
    """Pre-activation residual block x + W2 relu(W1 relu(x)) (paper Sec. 2; no normalization layers)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class PrimaryNetwork(nn.Module):
    """Maps the meta variable to an embedding e(z): Linear(z, d/4), blocks, Linear(d/4, d/2), blocks,
    Linear(d/2, d), blocks; the raw residual stream, no final activation (paper Fig. 1, d = 1024)."""

    def __init__(self, meta_dim: int, embedding_dim: int, blocks: int):
        super().__init__()
        if embedding_dim < 4 or embedding_dim % 4:
            raise ValueError(f"hyper embedding dim must be a positive multiple of 4, got {embedding_dim}")
        layers, width_in = [], meta_dim
        for width in (embedding_dim // 4, embedding_dim // 2, embedding_dim):
            layers.append(nn.Linear(width_in, width))
            layers.extend(ResBlock(width) for _ in range(blocks))
            width_in = width
        self.net = nn.Sequential(*layers)
        self.embedding_dim = embedding_dim

    def forward(self, meta):
        return self.net(meta)


class DynamicLayerHeads(nn.Module):
    """Three parallel linear heads of the embedding that give one dynamic layer's weight W(z)
    (out x in), bias b(z) and gain g(z) (paper Sec. 2)."""

    def __init__(self, embedding_dim: int, fan_in: int, fan_out: int):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.weight = nn.Linear(embedding_dim, fan_out * fan_in)
        self.bias = nn.Linear(embedding_dim, fan_out)
        self.gain = nn.Linear(embedding_dim, fan_out)

    def forward(self, e):
        return self.weight(e).view(-1, self.fan_out, self.fan_in), self.bias(e), self.gain(e)


def dynamic_forward(layers, base):
    """The dynamic network (paper eq. 1): x_{l+1} = relu((1 + g_l) * (W_l x_l) + b_l) with per-sample
    W_l, b_l, g_l; no non-linearity after the last layer. `layers` is a list of (W, b, g)."""
    x = base
    for i, (weight, bias, gain) in enumerate(layers):
        x = (1 + gain) * torch.einsum("boi,bi->bo", weight, x) + bias
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


class HyperCritic(nn.Module):
    """Q(s, a) = f_{w(meta)}(base). SA-Hyper: meta = state, base = action (the paper's proposal, eq. 14);
    AS-Hyper: meta = action, base = state. One dynamic hidden layer (paper: 256 units)."""

    def __init__(self, obs_dim, act_dim, meta_is_state: bool, embedding_dim=1024, blocks=2, dynamic_hidden=256):
        super().__init__()
        self.meta_is_state = meta_is_state
        meta_dim, base_dim = (obs_dim, act_dim) if meta_is_state else (act_dim, obs_dim)
        self.primary = PrimaryNetwork(meta_dim, embedding_dim, blocks)
        self.heads = nn.ModuleList(
            [
                DynamicLayerHeads(embedding_dim, base_dim, dynamic_hidden),
                DynamicLayerHeads(embedding_dim, dynamic_hidden, 1),
            ]
        )

    def dynamic_weights(self, meta):
        e = self.primary(meta)
        return [head(e) for head in self.heads]

    def forward(self, obs, act):
        meta, base = (obs, act) if self.meta_is_state else (act, obs)
        return dynamic_forward(self.dynamic_weights(meta), base)


def init_hypernetwork(
    critic: HyperCritic, scheme: str, meta_samples: torch.Tensor, embedding_norm: float = 8.0, weight_scale: float = 1.0
) -> None:
    """Initialize the primary network and heads.

    pytorch. The paper (Sec. 2) initializes the primary network so that "the initial dynamic
    weights distribution resembles, on average, Kaiming-uniform". We take that to be PyTorch's default
    nn.Linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(n)) for weights AND biases (n = fan-in), the
    init of every MLP critic here, and match it on `meta_samples`, the meta variables the critic first
    trains on (states visited by random actions for sa-hyper):
    1. Primary layers keep PyTorch's default init. Then the last stage is rescaled so that the embedding
       has root-mean-square norm `embedding_norm` over the samples: scaling a ReLU stage's input
       projection and every bias in it by c > 0 scales its output by exactly c.
    2. Weight and bias heads: weights U(+-h), biases 0. A generated weight is W_ij = sum_k H_ijk e_k, so over
       states E[W_ij^2] = (h^2 / 3) E|e|^2, and h = 1 / (sqrt(n) * embedding_norm) gives 1 / (3n), the
       variance of U(+-1/sqrt(n)). `weight_scale` multiplies h, and so every generated weight and bias, by
       that factor (1: nn.Linear's scale). The generated biases b(s) are random and state-dependent; with zero
       biases Q(s, .) would be positively homogeneous in the action, its maximum over the action box on
       the boundary, and a deterministic actor would be pulled to the action bounds from the start.
    3. Gain heads start at zero: every gain 1 + g(s) starts at exactly 1.
    The embedding norm sets the step size in generated-weight space: one Adam step moves each head weight
    by about the lr, so W moves by up to lr * sum_k |e_k| against its scale 1/sqrt(3n). With norm 8 the
    head bounds h are the released code's constants (0.05 at n = 6, 0.008 at n = 256), where the paper's
    critic lr 5e-5 was tuned, so the relative step per update matches theirs.

    authors (default): the released SAC code's constants, with which the paper's lr 5e-5 was tuned: primary weights
    U(+-1/sqrt(2 fan_in)) with PyTorch's default biases, every head weight U(+-0.05) (first layer) or U(+-0.008)
    (output layer), head biases 0.
    """
    with torch.no_grad():
        if scheme == "authors":
            for module in critic.primary.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / np.sqrt(2 * module.in_features)
                    nn.init.uniform_(module.weight, -bound, bound)  # the bias keeps PyTorch's default
            for head, bound in zip(critic.heads, (0.05, 0.008)):
                for fc in (head.weight, head.bias, head.gain):
                    nn.init.uniform_(fc.weight, -bound, bound)
                    nn.init.zeros_(fc.bias)
            return
        for module in critic.primary.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        norm = critic.primary(meta_samples).pow(2).sum(1).mean().sqrt().item()
        layers = list(critic.primary.net)
        last_stage = layers[max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)) :]
        last_stage[0].weight.mul_(embedding_norm / norm)
        for module in (m for layer in last_stage for m in layer.modules()):
            if isinstance(module, nn.Linear):
                module.bias.mul_(embedding_norm / norm)
        for head in critic.heads:
            bound = weight_scale / (np.sqrt(head.fan_in) * embedding_norm)
            for fc in (head.weight, head.bias):
                nn.init.uniform_(fc.weight, -bound, bound)
            nn.init.zeros_(head.gain.weight)
            for fc in (head.weight, head.bias, head.gain):
                nn.init.zeros_(fc.bias)


def mlp(in_dim: int, hidden: tuple, out_dim: int = 1) -> nn.Sequential:
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class MLPCritic(nn.Module):
    """concat(s, a) -> MLP -> Q. MLP-Standard 2x256, MLP-Small 1x256, MLP-Large 2x2900 (paper Sec. 5.2)."""

    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden)

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], 1))


class ResNetFeaturesCritic(nn.Module):
    """The same primary network on the state gives a feature vector, concatenated with the action into
    MLP-Standard (paper Sec. 5.2, ResNet Features)."""

    def __init__(self, obs_dim, act_dim, embedding_dim=1024, blocks=2):
        super().__init__()
        self.primary = PrimaryNetwork(obs_dim, embedding_dim, blocks)
        self.mlp = mlp(embedding_dim + act_dim, (256, 256))

    def forward(self, obs, act):
        return self.mlp(torch.cat([self.primary(obs), act], 1))


class Res35Critic(nn.Module):
    """Linear(s + a, 256), 35 residual blocks, ReLU, Linear(256, 1): about 4.6M weights (paper Sec. 5.2)."""

    def __init__(self, obs_dim, act_dim, blocks=35, width=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim + act_dim, width),
            *[ResBlock(width) for _ in range(blocks)],
            nn.ReLU(),
            nn.Linear(width, 1),
        )

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], 1))


class D2RLCritic(nn.Module):
    """Q-D2RL (Sinha et al. 2020): 4 hidden layers of 256; every hidden layer after the first also reads
    the raw input [s, a]."""

    def __init__(self, obs_dim, act_dim, layers=4, width=256):
        super().__init__()
        in_dim = obs_dim + act_dim
        self.hidden = nn.ModuleList([nn.Linear(in_dim if i == 0 else width + in_dim, width) for i in range(layers)])
        self.out = nn.Linear(width, 1)

    def forward(self, obs, act):
        x = torch.cat([obs, act], 1)
        h = x
        for i, layer in enumerate(self.hidden):
            h = F.relu(layer(h if i == 0 else torch.cat([h, x], 1)))
        return self.out(h)


def make_critic(args: Args, obs_dim: int, act_dim: int, meta_samples: Optional[torch.Tensor] = None) -> nn.Module:
    """Build one Q-network; a twin is two independent calls. Baselines keep PyTorch's default init (as
    CleanRL's critics do); `meta_samples` feed the pytorch hyper-init (unit Gaussian samples when None)."""
    if args.critic in HYPER_CRITICS:
        meta_is_state = args.critic == "sa-hyper"
        critic = HyperCritic(
            obs_dim, act_dim, meta_is_state, args.hyper_embedding_dim, args.hyper_blocks, args.hyper_dynamic_hidden
        )
        if meta_samples is None:
            meta_samples = torch.randn(256, obs_dim if meta_is_state else act_dim)
        init_hypernetwork(critic, args.hyper_init, meta_samples, args.hyper_embedding_norm, args.hyper_weight_scale)
        return critic
    if args.critic == "resnet-features":
        return ResNetFeaturesCritic(obs_dim, act_dim, args.hyper_embedding_dim, args.hyper_blocks)
    hidden = {"mlp": (256, 256), "mlp-small": (256,), "mlp-large": (args.mlp_large_width,) * 2}
    if args.critic in hidden:
        return MLPCritic(obs_dim, act_dim, hidden[args.critic])
    if args.critic == "res35":
        return Res35Critic(obs_dim, act_dim, args.res35_blocks)
    return D2RLCritic(obs_dim, act_dim)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # CleanRL / SpinUp-style bounds, reached smoothly through tanh


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy, 256-256 (SAC paper; CleanRL)."""

    def __init__(self, obs_dim, act_dim, action_low, action_high):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc_mean = nn.Linear(256, act_dim)
        self.fc_logstd = nn.Linear(256, act_dim)
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs):
        h = F.relu(self.fc2(F.relu(self.fc1(obs))))
        log_std = torch.tanh(self.fc_logstd(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.fc_mean(h), log_std

    def get_action(self, obs):
        """Returns a reparameterized sample, its log-probability (B, 1) and the deterministic action."""
        mean, log_std = self(obs)
        normal = torch.distributions.Normal(mean, log_std.exp(), validate_args=False)  # no checks: a sync each on a GPU
        u = normal.rsample()
        action = torch.tanh(u) * self.action_scale + self.action_bias
        # change of variables a = scale * tanh(u) + bias: log|da/du| = log(scale) + log(1 - tanh(u)^2),
        # with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable for large |u|
        log_det = torch.log(self.action_scale) + 2.0 * (np.log(2.0) - u - F.softplus(-2.0 * u))
        log_prob = (normal.log_prob(u) - log_det).sum(1, keepdim=True)
        return action, log_prob, torch.tanh(mean) * self.action_scale + self.action_bias


class frozen:
    """Context manager: the modules' parameters stop requiring grad, so a loss that goes through them
    (the actor loss through the critics) builds no autograd graph for their weights. For SA-Hyper this
    means the dynamic weights w(s) are computed without grad and only the dynamic network is
    differentiated, with respect to the action."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


SATURATED_PRE_TANH = 3.0  # tanh'(3) = 0.01: beyond this the squashed action barely follows its gradient


def actor_saturation_diagnostics(actor: Actor, qf1: nn.Module, qf2: nn.Module, obs) -> tuple:
    """What shows an actor being pulled to its action bounds:
    - the fraction of the actor's pre-tanh means with |mean| > 3, where tanh' < 0.01;
    - the sign agreement of d min(Q1, Q2)/da at the deterministic action across the batch,
      |mean_s sign(dQ/da_j)| averaged over the action dimensions j: 1 when every state pushes a dimension
      the same way (a critic whose maximum sits on the same bound everywhere), near 0 when the direction
      depends on the state."""
    with torch.no_grad():
        mean, _ = actor(obs)
    action = (torch.tanh(mean) * actor.action_scale + actor.action_bias).requires_grad_(True)
    with torch.enable_grad(), frozen(qf1, qf2):
        (grad,) = torch.autograd.grad(torch.min(qf1(obs, action), qf2(obs, action)).sum(), action)
    saturation = (mean.abs() > SATURATED_PRE_TANH).float().mean().item()
    return saturation, grad.sign().mean(0).abs().mean().item()


def embedding_rms(qf: nn.Module, obs, actions) -> Optional[float]:
    """Root-mean-square norm of a hypernetwork critic's embedding e(meta) on the batch, or None for other critics.
    With --hyper-init pytorch it starts at --hyper-embedding-norm; the generated weights are linear in e and Q is
    quadratic in it, so a value far above the start means the critic generates weights well outside the scale it
    was initialized and tuned at."""
    if not isinstance(qf, HyperCritic):
        return None
    with torch.no_grad():
        return qf.primary(obs if qf.meta_is_state else actions).pow(2).sum(1).mean().sqrt().item()


def soft_td_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, gamma):
    """y = r + gamma * (1 - terminated) * (min(Q1', Q2')(s', a') - alpha * log pi(a'|s')), a' ~ pi(s').
    Truncated transitions keep terminated = 0, so they bootstrap from the true final observation."""
    return rewards + gamma * (1.0 - terminations) * (torch.min(next_q1, next_q2) - alpha * next_log_prob)


def adam(params, lr: float) -> optim.Optimizer:
    """Adam with PyTorch's fused kernel: one pass over each tensor where the default for-loop version makes ~6, about
    3x faster on the hypernetwork critics' millions of parameters (docs/speed.md). Same update rule; results differ
    from the for-loop version by float rounding only."""
    params = list(params)
    try:
        return optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused Adam on the CPU; the for-loop one makes the same update
        return optim.Adam(params, lr=lr)


@torch.no_grad()
def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target, in one fused op over all parameters."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def critic_lr(args: Args) -> float:
    """The paper's tuned 5e-5 for hypernetwork critics, the SAC paper's 3e-4 otherwise, unless --q-lr is given."""
    return args.q_lr if args.q_lr is not None else (5e-5 if args.critic in HYPER_CRITICS else 3e-4)


class SAC:
    """The learner: tanh-Gaussian actor, twin critics with Polyak-averaged targets, their Adam optimizers and
    the entropy coefficient alpha = exp(log_alpha). `update` is one SAC update (Haarnoja et al. 2018, Alg. 1)."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, action_low, action_high, meta_samples, device):
        self.args = args
        self.actor = Actor(obs_dim, act_dim, action_low, action_high).to(device)
        self.qf1 = make_critic(args, obs_dim, act_dim, meta_samples).to(device)
        self.qf2 = make_critic(args, obs_dim, act_dim, meta_samples).to(device)
        self.qf1_target = copy.deepcopy(self.qf1).requires_grad_(False)
        self.qf2_target = copy.deepcopy(self.qf2).requires_grad_(False)
        self.q_optimizer = adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=critic_lr(args))
        self.actor_optimizer = adam(self.actor.parameters(), lr=args.policy_lr)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.tensor([np.log(args.alpha)], dtype=torch.float32, device=device, requires_grad=True)
        self.alpha_optimizer = adam([self.log_alpha], lr=args.alpha_lr)
        if args.reuse_critic_weights and not (isinstance(self.qf1, HyperCritic) and self.qf1.meta_is_state):
            raise ValueError("reuse_critic_weights needs SA-Hyper critics, whose weights depend on the state only")

    def update(self, obs, actions, rewards, next_obs, terminations) -> dict:
        """Critic, actor and (with autotune) alpha steps on one minibatch, then the target update; returns the
        losses and values for logging."""
        args, alpha = self.args, self.log_alpha.detach().exp()  # a tensor: .item() would wait for the device
        with torch.no_grad():
            next_actions, next_log_prob, _ = self.actor.get_action(next_obs)
            next_q1, next_q2 = self.qf1_target(next_obs, next_actions), self.qf2_target(next_obs, next_actions)
            target = soft_td_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, args.gamma)
        if args.reuse_critic_weights:  # SA-Hyper: generate the critics' networks for these states once
            weights = [self.qf1.dynamic_weights(obs), self.qf2.dynamic_weights(obs)]
            qf1_values, qf2_values = (dynamic_forward(layers, actions) for layers in weights)
        else:
            qf1_values, qf2_values = self.qf1(obs, actions), self.qf2(obs, actions)
        qf1_loss, qf2_loss = F.mse_loss(qf1_values, target), F.mse_loss(qf2_values, target)
        guarded_step(self.q_optimizer, qf1_loss + qf2_loss, "critic", qf1_loss=qf1_loss, qf2_loss=qf2_loss)

        # actor: no graph through the critics' weights, only through their input action
        pi, log_prob, _ = self.actor.get_action(obs)
        if args.reuse_critic_weights:  # the networks generated before the critic step, as constants
            constants = [[[t.detach() for t in layer] for layer in layers] for layers in weights]
            min_q_pi = torch.min(*(dynamic_forward(layers, pi) for layers in constants))
        else:
            with frozen(self.qf1, self.qf2):
                min_q_pi = torch.min(self.qf1(obs, pi), self.qf2(obs, pi))
        actor_loss = (alpha * log_prob - min_q_pi).mean()
        guarded_step(self.actor_optimizer, actor_loss, "actor", actor_loss=actor_loss)

        metrics = {"qf1_values": qf1_values.mean(), "qf2_values": qf2_values.mean(), "qf1_loss": qf1_loss,
                   "qf2_loss": qf2_loss, "qf_loss": (qf1_loss + qf2_loss) / 2.0, "actor_loss": actor_loss}  # fmt: skip
        if args.autotune:
            alpha_loss = (-self.log_alpha.exp() * (log_prob.detach() + self.target_entropy)).mean()
            guarded_step(self.alpha_optimizer, alpha_loss, "alpha", alpha_loss=alpha_loss)
            metrics["alpha_loss"] = alpha_loss
        polyak_update(self.qf1, self.qf1_target, args.tau)
        polyak_update(self.qf2, self.qf2_target, args.tau)
        return metrics

    PARTS = ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer", "alpha_optimizer")

    def state_dict(self) -> dict:
        parts = {name: getattr(self, name).state_dict() for name in self.PARTS}
        return {**parts, "log_alpha": self.log_alpha.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name in self.PARTS:
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])


class ReplayBuffer:
    """Uniform replay of (s, a, r, s', terminated) in numpy; its own RNG, so sampling is checkpointable."""

    FIELDS = ("obs", "next_obs", "actions", "rewards", "terminations")

    def __init__(self, capacity, obs_dim, act_dim, seed):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.terminations = np.zeros((capacity, 1), dtype=np.float32)
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs, next_obs, action, reward, terminated):
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.terminations[i] = reward, float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, device):
        idx = self.rng.integers(0, self.size, size=batch_size)
        arrays = (self.obs, self.actions, self.rewards, self.next_obs, self.terminations)
        if torch.device(device).type != "cuda":
            return [torch.as_tensor(a[idx], device=device) for a in arrays]
        # one pinned staging buffer and one asynchronous copy: the host does not wait for the device
        sizes = [batch_size * a.shape[1] for a in arrays]
        staging = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=True)
        for a, part in zip(arrays, staging.split(sizes)):
            a.take(idx, axis=0, out=part.numpy().reshape(batch_size, a.shape[1]))
        batch = staging.to(device, non_blocking=True)
        return [part.view(batch_size, a.shape[1]) for a, part in zip(arrays, batch.split(sizes))]

    def state_dict(self):
        arrays = {k: torch.from_numpy(getattr(self, k)[: self.size].copy()) for k in self.FIELDS}
        return {**arrays, "pos": self.pos, "size": self.size, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        n = state["size"]
        for k in self.FIELDS:
            getattr(self, k)[:n] = state[k].numpy()
        self.pos, self.size = state["pos"], n
        self.rng.bit_generator.state = state["rng"]


def evaluate(actor: Actor, env: gym.Env, episodes: int, seed: int, device) -> list:
    """Undiscounted returns of the deterministic policy tanh(mean). The env is reseeded with `seed` at every call,
    so every evaluation sees the same start states; no random number is drawn, so evaluating does not change
    training."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        episodic_return, done = 0.0, False
        while not done:
            with torch.no_grad():
                mean, _ = actor(torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0))
                action = torch.tanh(mean) * actor.action_scale + actor.action_bias
            obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
        if len(returns) < episodes:
            obs, _ = env.reset()
    return returns


def collect_meta_samples(args: Args, env_id: str, n: int, seed: int) -> torch.Tensor:
    """Meta-variable samples for the pytorch hyper-init, drawn as the critic first sees them: states
    visited by uniform-random actions (sa-hyper) or uniform-random actions (as-hyper). Uses its own
    environment and seed, so it leaves the training environment's randomness untouched."""
    env = make_env(env_id)
    env.action_space.seed(seed)
    if args.critic == "as-hyper":
        return torch.as_tensor(np.array([env.action_space.sample() for _ in range(n)]), dtype=torch.float32)
    obs, _ = env.reset(seed=seed)
    states = []
    while len(states) < n:
        states.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return torch.as_tensor(np.array(states), dtype=torch.float32)


# ======================================================================================================================
# RUN INFRASTRUCTURE: not the algorithm. Argument checks, the run directory, checkpoints and exact resume, the
# non-finite guard, Ctrl-C, the progress line, evaluating a saved model.
# ======================================================================================================================
SCRIPT = "hyper_sac.py"
FILE_FORMAT = "hyper_sac/2"  # checkpoints and models carry it; files of other scripts or versions are refused


def fail(message: str, code: int = 1) -> None:
    """One clear error line and a non-zero exit, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_args(args: Args) -> None:
    positive = ["total_timesteps", "buffer_size", "batch_size", "eval_episodes", "progress_freq", "hyper_embedding_dim",
                "hyper_dynamic_hidden", "hyper_init_samples", "mlp_large_width"]  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in [
        "seed",
        "learning_starts",
        "eval_freq",
        "checkpoint_freq",
        "hyper_blocks",
        "res35_blocks",
        "num_threads",
    ]:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            fail(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if args.hyper_embedding_dim % 4:
        fail(
            f"--hyper-embedding-dim must be a multiple of 4 (stages dim/4, dim/2, dim), got {args.hyper_embedding_dim}"
        )
    if args.reuse_critic_weights and args.critic != "sa-hyper":
        fail(f"--reuse-critic-weights needs --critic sa-hyper (the critic whose weights depend on the state only), "
             f"got --critic {args.critic}")  # fmt: skip
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.batch_size > max(args.learning_starts, 1):
        fail(
            f"--batch-size {args.batch_size} is larger than --learning-starts {args.learning_starts}: "
            "the first update would sample a buffer smaller than one batch"
        )
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    for name in ["policy_lr", "alpha_lr", "q_lr", "alpha", "hyper_embedding_norm", "hyper_weight_scale"]:
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ["policy_lr", "alpha_lr", "q_lr"]:  # Adam's first step is lr / (1 - beta1) = 10 lr, a float32 in torch
        value = getattr(args, name)
        if value is not None and value * 10 > np.finfo(np.float32).max:
            fail(f"--{name.replace('_', '-')} must be below 3.4e37 (Adam's first step, 10 lr, must fit a float32)")
    if not args.exp_name or os.sep in args.exp_name or (os.altsep and os.altsep in args.exp_name):
        fail(f"--exp-name must be a plain name (it becomes part of a directory name), got {args.exp_name!r}")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        fail('--capture-video needs moviepy: pip install -e ".[video]"')


def check_memory(args: Args, obs_dim: int, act_dim: int) -> None:
    """Refuse a replay buffer larger than the machine's memory before allocating it (numpy would allocate it
    lazily and the run would be killed once the buffer fills)."""
    needed = args.buffer_size * 4 * (2 * obs_dim + act_dim + 2)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and needed > memory:
        fail(
            f"--buffer-size {args.buffer_size} needs {needed / 2**30:.1f} GiB for the replay buffer; "
            f"this machine has {memory / 2**30:.1f} GiB"
        )


# Settings that may differ between a run and its resumption; every other setting changes what the run computes.
RESUME_MAY_DIFFER = ("total_timesteps", "progress_freq", "checkpoint_freq", "num_threads", "cuda", "track",
                     "wandb_project_name", "wandb_entity", "save_model", "resume", "eval_model", "capture_video",
                     "exp_name")  # fmt: skip
# Settings added after checkpoints of this format existed, with the value that computes what those checkpoints did
ADDED_SETTINGS = {"reuse_critic_weights": False}


def check_resume_settings(saved: dict, args: Args) -> None:
    differing = [
        f.name
        for f in dataclasses.fields(args)
        if f.name not in RESUME_MAY_DIFFER and saved.get(f.name, ADDED_SETTINGS.get(f.name)) != getattr(args, f.name)
    ]
    if differing:
        listing = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (given {getattr(args, k)})" for k in differing)
        fail(f"the checkpoint was made with different settings: {listing}; pass the same settings to resume")


class ResumableEnv(gym.Wrapper):
    """Records how the current episode began (its reset seed, or the environment's RNG state before an unseeded
    reset), the actions taken since, and the episode's return and length. `load_state_dict` replays them, which puts a
    deterministic environment back exactly where it was."""

    def reset(self, *, seed=None, options=None):
        rng = None if seed is not None else copy.deepcopy(self.unwrapped.np_random.bit_generator.state)
        self.start, self.actions = {"seed": seed, "rng": rng}, []
        self.episodic_return, self.episodic_length = 0.0, 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.actions.append(np.array(action, dtype=np.float32))
        self.episodic_return += float(reward)
        self.episodic_length += 1
        return obs, reward, terminated, truncated, info

    def state_dict(self) -> dict:
        actions = torch.as_tensor(np.array(self.actions, dtype=np.float32)).reshape(
            len(self.actions), *self.action_space.shape
        )
        return {
            "start": self.start,
            "actions": actions,
            "action_space_rng": self.action_space.np_random.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Replays the recorded episode; returns the current observation."""
        if state["start"]["seed"] is not None:
            obs, _ = self.reset(seed=state["start"]["seed"])
        else:
            self.unwrapped.np_random.bit_generator.state = state["start"]["rng"]
            obs, _ = self.reset()
        for action in state["actions"].numpy():
            obs, *_ = self.step(action)
        self.action_space.np_random.bit_generator.state = state["action_space_rng"]
        return obs


class GlobalRNGs:
    """The global random streams training draws from: Python's, NumPy's legacy one, torch's CPU and CUDA generators."""

    def state_dict(self) -> dict:
        name, key, pos, has_gauss, cached = np.random.get_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        numpy_state = [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached]
        return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        name, key, pos, has_gauss, cached = state["numpy"]
        random.setstate(state["python"])
        np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """The console line every --progress-freq steps: step, steps/s and ETA over the current phase (random actions,
    then learning; the first is much faster, so it gives no ETA), the latest training and evaluation returns."""

    def __init__(self, total_steps: int, step: int, learning_starts: int):
        self.total_steps, self.learning_starts = total_steps, learning_starts
        self.last_return, self.last_eval = float("nan"), float("nan")
        self.new_phase(step)

    def new_phase(self, step: int) -> None:
        self.since_time, self.since_step = time.time(), step

    def print(self, step: int) -> None:
        rate = (step - self.since_step) / max(time.time() - self.since_time, 1e-9)
        self.new_phase(step)
        eta = format_duration((self.total_steps - step) / max(rate, 1e-9))
        if step <= self.learning_starts < self.total_steps:
            eta = "after learning starts"  # the random steps' rate says nothing about the learning steps'
        fields = [f"step {step}/{self.total_steps}", f"{rate:.1f} steps/s", f"ETA {eta}"]
        fields += [
            f"{name} {v:.1f}" for name, v in (("return", self.last_return), ("eval", self.last_eval)) if np.isfinite(v)
        ]
        print(" | ".join(fields), flush=True)

    def state_dict(self) -> dict:
        return {"last_return": self.last_return, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.last_return, self.last_eval = state["last_return"], state["last_eval"]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class NonFinite(Exception):
    """A loss or, after an optimizer step, a weight is NaN or infinite."""


def guarded_step(optimizer: optim.Optimizer, loss: torch.Tensor, name: str, **losses: torch.Tensor) -> None:
    """zero_grad, backward, step, with the run's guard: the named losses must be finite before the step (so a NaN
    never reaches the weights) and every weight the optimizer owns must be finite after it. One host sync per check;
    the losses are checked once backward is queued, so that on a GPU the backward runs while the host waits."""
    optimizer.zero_grad()
    loss.backward()
    finite = torch.stack([torch.isfinite(value).all() for value in losses.values()]).tolist()
    for (loss_name, value), ok in zip(losses.items(), finite):
        if not ok:
            raise NonFinite(f"non-finite {loss_name} ({value.item()})")
    optimizer.step()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        raise NonFinite(f"non-finite weights after the {name} step")


def content_digest(obj) -> str:
    """SHA-256 over every tensor's bytes and every plain value of a nested checkpoint, in a fixed order."""
    digest = hashlib.sha256()

    def visit(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            digest.update(f"tensor{x.dtype}{tuple(x.shape)}".encode())
            digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}{len(x)}".encode())
            for item in x:
                visit(item)
        else:
            digest.update(repr(x).encode())

    visit(obj)
    return digest.hexdigest()


def save_file(contents: dict, path: str, kind: str) -> None:
    """Write a checkpoint or model: tensors and plain containers only (so it loads with torch.load(weights_only=True)),
    with its format, kind and a digest of its contents. Written to a temporary file, flushed to disk, then renamed
    over `path`: a crash or a full disk mid-write leaves the previous file intact."""
    contents = {**contents, "format": FILE_FORMAT, "kind": kind}
    contents["sha256"] = content_digest(contents)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(contents, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            fail(f"cannot write {path}: {e.strerror or e}; the previous file there, if any, is intact")
        raise


def load_file(path: str, kinds: tuple) -> dict:
    """Load a file written by save_file without running any code from it (weights_only), and refuse anything else:
    another script's or version's file, a corrupted one (its digest differs), or one of another kind."""
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"cannot load {path}: no such file")
    except Exception as e:  # unpickling errors, foreign pickles, truncated or random bytes: all end the same way
        fail(
            f"cannot load {path}: not a checkpoint or model written by {SCRIPT} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        )
    if not isinstance(contents, dict) or contents.get("format") != FILE_FORMAT:
        fail(f"cannot load {path}: not a checkpoint or model written by this version of {SCRIPT}")
    digest = contents.pop("sha256", None)
    if digest != content_digest(contents):
        fail(f"cannot load {path}: its contents do not match their checksum (the file is corrupted)")
    if contents["kind"] not in kinds:
        fail(f"cannot load {path}: it is a {contents['kind']}, expected a {' or '.join(kinds)}")
    return contents


def make_run_dir(args: Args) -> tuple:
    """A new directory runs/{env}__{exp_name}__{critic}__{seed}__{unix time}, suffixed -1, -2, ... when runs started in
    the same second took the name (mkdir is atomic, so two runs never share one)."""
    env_name = args.env_id.replace("/", "-").replace(":", "-")
    base = f"{env_name}__{args.exp_name}__{args.critic}__{args.seed}__{int(time.time())}"
    for i in range(1000):
        run_name = base if i == 0 else f"{base}-{i}"
        try:
            os.makedirs(os.path.join("runs", run_name))
            return run_name, os.path.join("runs", run_name)
        except FileExistsError:
            continue
        except OSError as e:
            fail(f"cannot create the run directory runs/{run_name}: {e.strerror or e}")
    fail(f"cannot find a free run directory name for {base}")


def save_checkpoint(path, args, run_name, global_step, obs, agent, rb, env, rngs, progress) -> None:
    """Everything a resumed run needs, each part from its object's state_dict."""
    objects = {"agent": agent, "replay_buffer": rb, "env": env, "rngs": rngs, "progress": progress}
    contents = {"args": vars(args), "run_name": run_name, "global_step": global_step, "obs": torch.as_tensor(obs)}
    save_file({**contents, **{name: obj.state_dict() for name, obj in objects.items()}}, path, kind="checkpoint")


def restore_checkpoint(checkpoint, agent, rb, env, rngs, progress) -> tuple:
    """Puts every object back where the checkpoint left it; returns (global_step, current observation)."""
    try:
        agent.load_state_dict(checkpoint["agent"])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"the checkpoint's networks do not fit these settings: {str(e).splitlines()[0][:200]}")
    rb.load_state_dict(checkpoint["replay_buffer"])
    obs = env.load_state_dict(checkpoint["env"])
    if not np.array_equal(obs, checkpoint["obs"].numpy()):
        fail(
            f"{env.spec.id} did not reproduce the checkpoint's observation when replayed; "
            "it is not deterministic, so the run cannot be resumed exactly"
        )
    rngs.load_state_dict(checkpoint["rngs"])
    progress.load_state_dict(checkpoint["progress"])
    return checkpoint["global_step"], obs


class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of the current step, where its state is consistent and can
    be checkpointed; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            fail("interrupted twice; stopped without writing a checkpoint", code=130)
        self.requested = True
        print("stopping at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def resume_command(checkpoint_path: str) -> str:
    """This run's command line with --resume pointing at `checkpoint_path`."""
    flags, skip_next = [], False
    for arg in sys.argv[1:]:
        if skip_next or arg.startswith("--resume="):
            skip_next = False
            continue
        if arg == "--resume":
            skip_next = True
            continue
        flags.append(arg)
    return shlex.join(["python", SCRIPT, *flags, "--resume", checkpoint_path])


@contextlib.contextmanager
def out_of_memory_fails(what: str):
    """A failed allocation (MemoryError, or torch's RuntimeError) ends the run with one error line."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e):
            raise
        fail(f"not enough memory for {what} at these sizes ({type(e).__name__})")


def open_writer(args: Args, run_name: str, run_dir: str, resumed_at: Optional[int]) -> SummaryWriter:
    """The TensorBoard writer (mirrored to Weights and Biases with --track), the hyperparameter table first. A resumed
    run purges what the interrupted one logged after its checkpoint."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights and Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir, purge_step=resumed_at + 1 if resumed_at is not None else None)
    settings = {**vars(args), "q_lr (effective)": critic_lr(args)}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    return writer


def checkpoint_due(args: Args, step: int) -> bool:
    return bool(args.checkpoint_freq) and (step % args.checkpoint_freq == 0 or step == args.total_timesteps)


def exit_interrupted(writer: SummaryWriter, step: int, checkpoint_path: str) -> None:
    writer.close()
    print(
        f"interrupted at step {step}; checkpoint written; resume with: {resume_command(checkpoint_path)}",
        file=sys.stderr,
    )
    sys.exit(130)


def exit_non_finite(writer: SummaryWriter, error: NonFinite, step: int, checkpoint_path: str) -> None:
    writer.close()
    intact = os.path.exists(checkpoint_path)
    fail(
        f"{error} at step {step}; stopping, "
        + (f"the last checkpoint ({checkpoint_path}) is intact" if intact else "no checkpoint was written")
    )


def evaluate_saved_model(args: Args, device) -> None:
    """--eval-model: evaluate the actor of a saved model or checkpoint for --eval-episodes episodes."""
    saved = load_file(args.eval_model, kinds=("model", "checkpoint"))
    actor_state = saved["actor"] if saved["kind"] == "model" else saved["agent"]["actor"]
    env_id = saved["args"]["env_id"]
    env = make_env(env_id, render_mode="rgb_array" if args.capture_video else None)
    if args.capture_video:
        video_dir = os.path.join(
            "videos", f"{os.path.basename(os.path.dirname(os.path.abspath(args.eval_model)))}-eval"
        )
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: True, disable_logger=True)
    actor = Actor(
        env.observation_space.shape[0], env.action_space.shape[0], env.action_space.low, env.action_space.high
    ).to(device)
    try:
        actor.load_state_dict(actor_state)
    except RuntimeError as e:
        fail(f"the saved actor does not fit {env_id}: {str(e).splitlines()[0][:200]}")
    returns = evaluate(actor, env, args.eval_episodes, args.seed + 100, device)
    env.close()
    print(
        f"{env_id}: {len(returns)} episodes, return {np.mean(returns):.1f} +- {np.std(returns):.1f} "
        f"(min {np.min(returns):.1f}, max {np.max(returns):.1f})"
    )


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_model:
        evaluate_saved_model(args, device)
        sys.exit(0)
    checkpoint = load_file(args.resume, kinds=("checkpoint",)) if args.resume else None
    if checkpoint is not None:
        check_resume_settings(checkpoint["args"], args)
    stop = StopRequest()

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # env setup: one training env with explicit resets (recorded, for exact resume), one evaluation env
    env = ResumableEnv(make_env(args.env_id))
    eval_env = make_env(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.action_space.seed(args.seed)
    check_memory(args, obs_dim, act_dim)

    # ALGO LOGIC: initialize agent here
    meta_samples = None
    if args.critic in HYPER_CRITICS and args.hyper_init == "pytorch":
        meta_samples = collect_meta_samples(args, args.env_id, args.hyper_init_samples, args.seed + 200)
    with out_of_memory_fails("the networks and the replay buffer"):
        agent = SAC(args, obs_dim, act_dim, env.action_space.low, env.action_space.high, meta_samples, device)
        rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, args.seed)
    rngs, progress = GlobalRNGs(), Progress(args.total_timesteps, 0, args.learning_starts)

    # TRY NOT TO MODIFY: start the game
    obs, _ = env.reset(seed=args.seed)
    start_step = 0
    if checkpoint is not None:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(os.path.abspath(args.resume))
        start_step, obs = restore_checkpoint(checkpoint, agent, rb, env, rngs, progress)
        progress.new_phase(start_step)
        print(f"resumed {run_name} at step {start_step} from {args.resume}")
    else:
        run_name, run_dir = make_run_dir(args)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    writer = open_writer(args, run_name, run_dir, resumed_at=start_step if checkpoint is not None else None)
    n_params = sum(p.numel() for p in agent.qf1.parameters())
    print(
        f"{run_name}: critic {args.critic} ({n_params:,} parameters per Q-network), "
        f"q_lr {critic_lr(args):g}, device {device}"
    )

    start_time, global_step = time.time(), start_step
    try:
        for global_step in range(start_step + 1, args.total_timesteps + 1):
            # ALGO LOGIC: put action logic here
            if global_step <= args.learning_starts:
                action = env.action_space.sample()
            else:
                with torch.no_grad():
                    obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                    action, _, _ = agent.actor.get_action(obs_t)
                action = action[0].cpu().numpy()

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminated, truncated, _ = env.step(action)
            # next_obs is the true final observation even on truncation: there is no autoreset here
            rb.add(obs, next_obs, action, reward, terminated)
            obs = next_obs  # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", env.episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", env.episodic_length, global_step)
                progress.last_return = env.episodic_return
                obs, _ = env.reset()

            # ALGO LOGIC: training.
            if global_step > args.learning_starts:
                batch = rb.sample(args.batch_size, device)
                metrics = agent.update(*batch)
                if global_step % 100 == 0:
                    for name, value in metrics.items():
                        writer.add_scalar(f"losses/{name}", value.item(), global_step)
                    writer.add_scalar("losses/alpha", agent.log_alpha.exp().item(), global_step)
                    diagnostics = actor_saturation_diagnostics(agent.actor, agent.qf1, agent.qf2, batch[0])
                    saturation, grad_agreement = diagnostics
                    writer.add_scalar("charts/actor_saturation", saturation, global_step)
                    writer.add_scalar("charts/action_grad_sign_agreement", grad_agreement, global_step)
                    rms = embedding_rms(agent.qf1, batch[0], batch[1])
                    if rms is not None:
                        writer.add_scalar("charts/embedding_rms", rms, global_step)

            if args.eval_freq and global_step % args.eval_freq == 0:
                returns = evaluate(agent.actor, eval_env, args.eval_episodes, args.seed + 100, device)
                progress.last_eval = float(np.mean(returns))
                writer.add_scalar("eval/episodic_return", progress.last_eval, global_step)
            if global_step % 100 == 0:
                writer.add_scalar(
                    "charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step
                )
            if global_step % args.progress_freq == 0 or global_step == args.total_timesteps:
                progress.print(global_step)
            if global_step == args.learning_starts:
                progress.new_phase(global_step)  # from here the rate, and so the ETA, is that of learning steps
            if stop.requested or checkpoint_due(args, global_step):
                save_checkpoint(checkpoint_path, args, run_name, global_step, obs, agent, rb, env, rngs, progress)
            if stop.requested:
                exit_interrupted(writer, global_step, checkpoint_path)
    except NonFinite as e:
        exit_non_finite(writer, e, global_step, checkpoint_path)

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        nets = {"actor": agent.actor.state_dict(), "qf1": agent.qf1.state_dict(), "qf2": agent.qf2.state_dict()}
        save_file({"args": vars(args), **nets}, model_path, kind="model")
        print(f"model saved to {model_path}; evaluate it with: python {SCRIPT} --eval-model {model_path}")
    env.close()
    eval_env.close()
    writer.close()
