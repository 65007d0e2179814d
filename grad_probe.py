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
# docs and measured results: docs/grad_probe.md
"""How accurate is a critic's action-gradient? The gradient-accuracy experiment of Sarafian, Keynan & Kraus,
"Recomposing the Reinforcement Learning Building Blocks with Hypernetworks" (ICML 2021), Sec. 3, Figs. 3-4.

An actor-critic method improves its policy only through the critic's action-gradient grad_a Q_phi(s, a)
(the deterministic policy gradient). This script trains TD3 agents with three critics, one after another
from the same seed, and every --probe-freq steps compares each critic's grad_a Q1(s, pi(s)) with the "true"
grad_a Q^pi(s, a) of the current policy, measured in the simulator:

    python grad_probe.py --env-id Hopper-v4 --plot            # sa-hyper, as-hyper and mlp
    python grad_probe.py --critics mlp --total-timesteps 50000
    python grad_probe.py --snapshots runs/<hyper_td3 run>/snapshots --plot   # probe saved models, no training
    python grad_probe.py --plot-from runs/A/grad_probe.pt runs/B/grad_probe.pt   # redraw the figures

One probe:
1. States: --probe-states simulator states, each reached by resetting and running the current deterministic
   policy for U{0, ..., --probe-start-steps - 1} steps (resetting whenever an episode ends). The full MuJoCo
   integration state is saved (mj_getState: time, qpos, qvel, activations, warm start, controls, ...), so a
   restored copy continues bit-identically.
2. Actions: the policy's action a_bar and --probe-actions - 1 perturbations a_bar + da, da ~ N(0, sigma^2 I),
   sigma = --probe-sigma in units of each dimension's action scale, clipped to the action bounds.
3. Return of each action: restore the state, apply the action for --action-repeat steps, then follow the
   deterministic policy until the episode ends; discounted by gamma. If the time limit cuts the rollout,
   the return is bootstrapped with gamma^T min(Q1', Q2')(s_T, pi(s_T)) of the target critics (as training
   bootstraps a time-out). The rollouts of one state run in lockstep, one batched actor call per step.
4. "True" gradient: the slope of the least-squares fit, with intercept, of the returns against the applied
   actions (paper Sec. 3; identical to the authors' pairwise-difference normal equations).
5. Score: the cosine similarity between grad_a Q1(s, a_bar) of the online critic and that slope. Where either
   has zero norm (e.g. every perturbed rollout ends identically), the direction and so the cosine is undefined
   (the paper's "local equilibrium" states): such states count as not learnable and are left out of the mean.

Logged per critic to TensorBoard (one run directory per critic under runs/{run_name}/): grad/cosine_similarity
(mean over states, Fig. 3d), grad/learnable_states_tau_{0, 0.2, 0.4, 0.6, 0.8} (fraction of probed states with
CS > tau, Figs. 3b-c), a histogram of the per-state CS, the learning curve (Fig. 4: eval/episodic_return) and
CleanRL's charts/ and losses/ tags. Every per-state number (observations, actions, returns, critic Q-values and
gradients, fitted gradients, CS) goes to runs/{run_name}/grad_probe.pt, rewritten after every probe; it holds only
tensors and plain containers, so torch.load(path, weights_only=True) reads it without running code from it.
--plot draws Fig. 3 (a-d) and Fig. 4 into runs/{run_name}/ (needs matplotlib). Files given to --snapshots and
--plot-from are loaded the same way and verified (format and SHA-256 digest); anything else is refused. Ctrl-C stops
at the end of the current step and keeps the results so far (there is no resume).

TD3 and the critics are those of hyper_td3.py (same defaults: batch 100, 1000 random steps, critic lr 5e-5 for
hypernetwork critics and 3e-4 for the MLP, same hypernetwork init); see that file for the algorithm.

Where this differs from the authors' gradient test (github keynans/HypeRL, TD3/bias_test.py):
- --action-repeat defaults to 1: the perturbed action is applied once, so the probe measures grad_a Q^pi(s, a)
  as the paper defines Q. Their code held it for 3 steps; --action-repeat 3 reproduces that.
- Perturbations and the action clip use each dimension's action scale and bounds; theirs assumed bounds +-1.
- The CS, the tau thresholds and the figures are computed here; their release saves only the raw gradients.
- Probes run inside training (or on hyper_td3.py snapshots); their script needed whole-agent pickles that their
  training code never wrote, and as released it does not compile.
- Same as theirs: 15 states, 15 actions (the first one unperturbed), sigma 0.3, one rollout per action (MuJoCo
  and the deterministic actor are deterministic), states after U{0..999} policy steps, target-critic bootstrap
  at the time limit, gradient of the online Q1 at the policy action.
"""

import contextlib
import copy
import dataclasses
import glob
import hashlib
import os
import random
import re
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

ProbeCritic = Literal["sa-hyper", "as-hyper", "mlp"]
HYPER_CRITICS = ("sa-hyper", "as-hyper")
TAUS = (0.0, 0.2, 0.4, 0.6, 0.8)


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "grad_probe"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of every critic's run (environment, networks, noise, replay sampling, probe states)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True` (disable with --no-torch-deterministic)"""
    cuda: bool = True
    """use CUDA when it is available (disable with --no-cuda)"""
    num_threads: int = 0
    """torch CPU threads; 0 keeps torch's default (all cores)"""
    eval_freq: int = 5000
    """evaluate the deterministic policy every this many environment steps for the learning curve (0 disables)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    progress_freq: int = 1000
    """print a progress line (step, steps/s, ETA, returns, last CS) every this many steps"""
    save_model: bool = False
    """save each critic's final actor and critics to runs/{run_name}/{critic}/{exp_name}.cleanrl_model"""
    plot: bool = False
    """draw Fig. 3 (a-d) and Fig. 4 as PNG into runs/{run_name}/ at the end (needs matplotlib)"""
    plot_from: tuple[str, ...] = ()
    """only draw the figures from these grad_probe.pt files (several runs are merged), into --plot-dir"""
    plot_dir: Optional[str] = None
    """where --plot-from writes its PNGs (default: the directory of the first file)"""
    snapshots: tuple[str, ...] = ()
    """probe saved models instead of training (hyper_td3.py's or this script's --save-model): .cleanrl_model files
    or directories of them (e.g. a run's snapshots/)"""

    # --- probe (paper Sec. 3) ---
    critics: tuple[ProbeCritic, ...] = ("sa-hyper", "as-hyper", "mlp")
    """critics to train and probe, one after another with the same seed"""
    probe_freq: int = 10000
    """probe the current agent every this many environment steps (the authors: 10000)"""
    probe_states: int = 15
    """states per probe"""
    probe_actions: int = 15
    """actions per state: the policy action and probe_actions - 1 perturbations (the paper's N_r)"""
    probe_sigma: float = 0.3
    """std of the action perturbations, in units of each dimension's action scale"""
    action_repeat: int = 1
    """steps the perturbed action is held before the policy takes over (1: the paper's Q; the authors' code: 3)"""
    probe_start_steps: int = 1000
    """a probe state is reached after U{0, ..., probe_start_steps - 1} policy steps from reset"""

    # --- algorithm (TD3, as hyper_td3.py) ---
    env_id: str = "HalfCheetah-v4"
    """the gymnasium MuJoCo environment id (the probe saves and restores MuJoCo states)"""
    total_timesteps: int = 1000000
    """environment steps of each critic's run"""
    buffer_size: int = 1000000
    """replay buffer capacity (transitions)"""
    gamma: float = 0.99
    """discount factor (training and probe returns)"""
    tau: float = 0.005
    """Polyak averaging coefficient of the target actor and critics"""
    batch_size: int = 100
    """minibatch size of each update"""
    learning_starts: int = 1000
    """uniform-random actions for this many steps before learning starts"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: Optional[float] = None
    """critic learning rate; default 5e-5 for hypernetwork critics (paper) and 3e-4 for the MLP"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise, in units of the action scale"""
    noise_clip: float = 0.5
    """the smoothing noise is clipped to +-noise_clip, in units of the action scale"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, in units of the action scale"""
    policy_frequency: int = 2
    """update the actor and the targets once every this many critic updates"""

    # --- model (as hyper_td3.py) ---
    hyper_embedding_dim: int = 1024
    """width of the primary network's output embedding; its stages are dim/4, dim/2, dim (paper: 256, 512, 1024)"""
    hyper_blocks: int = 2
    """residual blocks per stage of the primary network (paper: 2)"""
    hyper_dynamic_hidden: int = 256
    """hidden units of the single hidden layer of the dynamic network (paper: 256)"""
    hyper_init: Literal["authors", "pytorch"] = "authors"
    """authors: the released TD3 code's constants, with which the paper's critic lr was tuned; pytorch: generated
    weights and biases match PyTorch's default nn.Linear init on average over the first states, gains 1"""
    hyper_embedding_norm: float = 8.0
    """--hyper-init pytorch: rms norm of the primary network's embedding over the first states; sets how far one
    Adam step moves the generated weights (8: as far as with the released constants)"""
    hyper_weight_scale: float = 1.0
    """--hyper-init pytorch: generated weights and biases start at this multiple of nn.Linear's default scale on
    the first states (1: nn.Linear's)"""
    hyper_init_samples: int = 1000
    """meta-variable samples (random-action states, or random actions for as-hyper) used by --hyper-init pytorch"""


def make_env(env_id: str) -> gym.Env:
    try:
        env = gym.make(env_id)
    except Exception as e:  # unknown id, missing dependency, bad kwargs: all end the run the same way
        fail(f"cannot make environment {env_id!r}: {type(e).__name__}: {e}")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{env_id} has a {type(env.action_space).__name__} action space; TD3 needs a continuous Box action space")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        fail(f"{env_id} must have a flat Box observation space, got {env.observation_space}")
    if not np.all(np.isfinite(env.action_space.low)) or not np.all(np.isfinite(env.action_space.high)):
        fail(f"{env_id} has an unbounded action space; a tanh actor needs finite bounds")
    if not (hasattr(env.unwrapped, "model") and hasattr(env.unwrapped, "data")) and not hasattr(
        env.unwrapped, "set_sim_state"
    ):
        fail(f"{env_id} is not a MuJoCo environment: the probe needs to save and restore the simulator state")
    if env.spec is None or env.spec.max_episode_steps is None:
        fail(f"{env_id} has no time limit (max_episode_steps); the probe's rollouts need one")
    return env


# ---------------------------------------------------------------------------------------------------------------
# Simulator snapshots. MuJoCo envs: the full integration state via mj_getState / mj_setState. Any other env can
# take part by defining get_sim_state() and set_sim_state(state) -> observation on its unwrapped class.
def get_sim_state(env: gym.Env) -> np.ndarray:
    u = env.unwrapped
    if hasattr(u, "get_sim_state"):
        return u.get_sim_state()
    state = np.empty(mujoco.mj_stateSize(u.model, mujoco.mjtState.mjSTATE_INTEGRATION))
    mujoco.mj_getState(u.model, u.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    return state


def set_sim_state(env: gym.Env, state: np.ndarray) -> np.ndarray:
    """Restore a snapshot and return the observation the policy sees there."""
    u = env.unwrapped
    if hasattr(u, "set_sim_state"):
        return u.set_sim_state(state)
    mujoco.mj_setState(u.model, u.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(u.model, u.data)  # derived quantities (contacts, sensors) some observations read
    # before MuJoCo 3.3.6, mj_forward also overwrote qacc_warmstart, part of the state, and the next step then differed
    mujoco.mj_setState(u.model, u.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    return u._get_obs()


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: networks (those of hyper_td3.py; state dicts are interchangeable, so its snapshots load here).
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
    """Three parallel linear heads of the embedding: one dynamic layer's weight W(z) (out x in), bias b(z) and
    gain g(z)."""

    def __init__(self, embedding_dim: int, fan_in: int, fan_out: int):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.weight = nn.Linear(embedding_dim, fan_out * fan_in)
        self.bias = nn.Linear(embedding_dim, fan_out)
        self.gain = nn.Linear(embedding_dim, fan_out)

    def forward(self, e):
        return self.weight(e).view(-1, self.fan_out, self.fan_in), self.bias(e), self.gain(e)


def dynamic_forward(layers, base):
    """The dynamic network (paper eq. 1): x_{l+1} = relu((1 + g_l) * (W_l x_l) + b_l), linear last layer."""
    x = base
    for i, (weight, bias, gain) in enumerate(layers):
        x = (1 + gain) * torch.einsum("boi,bi->bo", weight, x) + bias
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


class HyperCritic(nn.Module):
    """Q(s, a) = f_{w(meta)}(base). SA-Hyper: meta = state, base = action (paper eq. 14); AS-Hyper: the reverse.
    For SA-Hyper, grad_a Q = W_1(s)^T diag(...) W_2(s)^T: state-dependent matrices shape the action-gradient."""

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


def q_at_actions(qf: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Q(s_i, a_ij) for obs (S, obs_dim) and actions (S, N, act_dim) -> (S, N). For SA-Hyper the state is the meta
    variable, so its dynamic weights are generated once per state and shared by that state's N actions."""
    n_states, n_actions, act_dim = actions.shape
    flat_actions = actions.reshape(-1, act_dim)
    if isinstance(qf, HyperCritic) and qf.meta_is_state:
        layers = [tuple(t.repeat_interleave(n_actions, 0) for t in layer) for layer in qf.dynamic_weights(obs)]
        return dynamic_forward(layers, flat_actions).view(n_states, n_actions)
    return qf(obs.repeat_interleave(n_actions, 0), flat_actions).view(n_states, n_actions)


def init_hypernetwork(
    critic: HyperCritic, scheme: str, meta_samples: torch.Tensor, embedding_norm: float = 8.0, weight_scale: float = 1.0
) -> None:
    """pytorch (derivation in hyper_td3.py): the generated weights and biases have, on average over `meta_samples`,
    the statistics of PyTorch's default nn.Linear init U(+-1/sqrt(n)), and every gain starts at 1. Primary layers
    keep PyTorch's default init, with the last stage rescaled (projection and its biases, exact for a ReLU stage) to
    embedding rms norm `embedding_norm`; weight and bias heads U(+-weight_scale/(sqrt(n) embedding_norm))
    (`weight_scale` multiplies every generated weight and bias); gain heads and head biases zero. authors (default):
    the released TD3 constants (primary U(+-1/(2 sqrt(fan_in))), head weights U(+-0.05) / U(+-0.008), head biases
    0)."""
    with torch.no_grad():
        if scheme == "authors":
            for module in critic.primary.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / (2.0 * np.sqrt(module.in_features))
                    nn.init.uniform_(module.weight, -bound, bound)
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


class MLPCritic(nn.Module):
    """concat(s, a) -> 2x256 MLP -> Q (MLP-Standard). Its grad_a Q depends on s only through the ReLU pattern
    (eq. 13)."""

    def __init__(self, obs_dim, act_dim, hidden=(256, 256)):
        super().__init__()
        layers, in_dim = [], obs_dim + act_dim
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.net = nn.Sequential(*layers, nn.Linear(in_dim, 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], 1))


def make_critic(
    critic: str, config: dict, obs_dim: int, act_dim: int, meta_samples: Optional[torch.Tensor] = None
) -> nn.Module:
    """One Q-network; `config` holds the hyper_* size and init settings (an Args as a dict, or a saved run's args)."""
    if critic == "mlp":
        return MLPCritic(obs_dim, act_dim)
    meta_is_state = critic == "sa-hyper"
    q = HyperCritic(
        obs_dim,
        act_dim,
        meta_is_state,
        config["hyper_embedding_dim"],
        config["hyper_blocks"],
        config["hyper_dynamic_hidden"],
    )
    if meta_samples is None:
        meta_samples = torch.randn(256, obs_dim if meta_is_state else act_dim)
    init_hypernetwork(
        q,
        config["hyper_init"],
        meta_samples,
        config.get("hyper_embedding_norm", 8.0),
        config.get("hyper_weight_scale", 1.0),
    )
    return q


class Actor(nn.Module):
    """Deterministic policy pi(s) = tanh(MLP(s)) rescaled to the action bounds, 256-256."""

    def __init__(self, obs_dim, act_dim, action_low, action_high):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc_mu = nn.Linear(256, act_dim)
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def forward(self, obs):
        h = F.relu(self.fc2(F.relu(self.fc1(obs))))
        return torch.tanh(self.fc_mu(h)) * self.action_scale + self.action_bias


class frozen:
    """Context manager: the modules' parameters stop requiring grad, so autograd builds no graph for them."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


@torch.no_grad()
def policy_actions(actor: Actor, obs: np.ndarray, device) -> np.ndarray:
    """The deterministic policy on a batch of observations, as float32 numpy."""
    return actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the probe (paper Sec. 3).
def critic_action_gradient(qf: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """grad_a Q(s, a) per row. The critic is frozen: only the action carries a graph."""
    actions = actions.detach().requires_grad_(True)
    with frozen(qf):
        (grad,) = torch.autograd.grad(qf(obs, actions).sum(), actions)
    return grad


def least_squares_gradient(delta_actions: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """Slope g of the fit returns ~ c + delta_a . g with intercept c, per state: (S, N, A), (S, N) -> (S, A).
    Uses an SVD-based solver, so a rank-deficient design (a dimension clipped at its bound for every sample)
    gives the minimum-norm slope instead of an error."""
    design = torch.cat([torch.ones_like(delta_actions[..., :1]), delta_actions], dim=-1).double()
    solution = torch.linalg.lstsq(design, returns.double().unsqueeze(-1), driver="gelsd").solution
    return solution[..., 1:, 0].to(delta_actions.dtype)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise a.b / (|a| |b|); NaN where either vector has (near) zero norm, since it then has no direction."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / norms.clamp_min(eps)
    return torch.where((a.norm(dim=-1) > eps) & (b.norm(dim=-1) > eps), cos, torch.full_like(cos, float("nan")))


def learnable_fraction(cos: torch.Tensor, taus) -> list:
    """Fraction of states with CS > tau, for each tau (paper Figs. 3a-c). Undefined CS (NaN) counts as not
    learnable, so the denominator is every probed state."""
    return [float((cos > tau).double().mean()) for tau in taus]


def sample_probe_states(
    envs, actor: Actor, rng: np.random.Generator, n: int, max_start_steps: int, max_episode_steps: int, device
):
    """n simulator snapshots reached by the deterministic policy: envs[i] resets (seeded from rng) and runs pi for
    U{0..max_start_steps-1} steps, resetting when an episode ends. All n run in lockstep (one actor call per step).
    Returns the snapshots, their observations, each one's steps since its episode began, and the steps taken."""
    targets = rng.integers(0, max_start_steps, size=n)
    obs = np.stack([envs[i].reset(seed=int(rng.integers(2**31)))[0] for i in range(n)])
    episode_steps = np.zeros(n, dtype=np.int64)
    for t in range(int(targets.max(initial=0))):
        active = np.flatnonzero(targets > t)
        actions = policy_actions(actor, obs[active], device)
        for i, action in zip(active, actions):
            obs[i], _, terminated, _, _ = envs[i].unwrapped.step(action)
            episode_steps[i] += 1
            if terminated or episode_steps[i] >= max_episode_steps:
                obs[i] = envs[i].reset(seed=int(rng.integers(2**31)))[0]
                episode_steps[i] = 0
    return [get_sim_state(envs[i]) for i in range(n)], obs.astype(np.float32), episode_steps, int(targets.sum())


def rollout_returns(envs, snapshot, first_actions: np.ndarray, actor: Actor, qf1_target: nn.Module,
                    qf2_target: nn.Module, horizon: int, action_repeat: int, gamma: float, device):  # fmt: skip
    """Discounted return of each first action from one snapshot: envs[j] restores it, applies first_actions[j] for
    action_repeat steps, then follows pi; rollouts end at termination (no bootstrap) or after `horizon` steps,
    where gamma^horizon min(Q1', Q2')(s, pi(s)) is added. Returns (returns, environment steps taken)."""
    n = len(first_actions)
    obs = np.stack([set_sim_state(envs[j], snapshot) for j in range(n)]).astype(np.float32)
    returns, alive, steps = np.zeros(n), np.ones(n, dtype=bool), 0
    for t in range(horizon):
        active = np.flatnonzero(alive)
        if len(active) == 0:
            break
        actions = first_actions[active] if t < action_repeat else policy_actions(actor, obs[active], device)
        for j, action in zip(active, actions):
            obs[j], reward, terminated, _, _ = envs[j].unwrapped.step(action)
            returns[j] += gamma**t * float(reward)
            alive[j] = not terminated
        steps += len(active)
    cut = np.flatnonzero(alive)
    if len(cut):
        with torch.no_grad():
            s = torch.as_tensor(obs[cut], dtype=torch.float32, device=device)
            a = actor(s)
            returns[cut] += gamma**horizon * torch.min(qf1_target(s, a), qf2_target(s, a))[:, 0].double().cpu().numpy()
    return returns, steps


def run_probe(
    envs, actor, qf1, qf1_target, qf2_target, args, rng: np.random.Generator, max_episode_steps: int, device
) -> dict:
    """One probe of the current agent: args.probe_states states x args.probe_actions actions. Returns a dict of
    per-state tensors (see the module docstring) and the cost in environment steps and seconds."""
    start = time.time()
    low = torch.as_tensor(envs[0].action_space.low, device=device)
    high = torch.as_tensor(envs[0].action_space.high, device=device)
    snapshots, obs, episode_steps, env_steps = sample_probe_states(
        envs, actor, rng, args.probe_states, args.probe_start_steps, max_episode_steps, device
    )  # fmt: skip
    obs_t = torch.as_tensor(obs, device=device)
    with torch.no_grad():
        policy_action = actor(obs_t)
    noise = torch.as_tensor(
        rng.normal(0.0, args.probe_sigma, size=(args.probe_states, args.probe_actions, policy_action.shape[1])),
        dtype=torch.float32,
        device=device,
    )
    noise[:, 0] = 0.0  # the first action of every state is the policy's own
    actions = torch.max(torch.min(policy_action[:, None] + noise * actor.action_scale, high), low)
    returns = np.zeros((args.probe_states, args.probe_actions))
    for i, snapshot in enumerate(snapshots):
        horizon = max_episode_steps - int(episode_steps[i])
        first_actions = actions[i].cpu().numpy()
        returns[i], steps = rollout_returns(
            envs,
            snapshot,
            first_actions,
            actor,
            qf1_target,
            qf2_target,
            horizon,
            args.action_repeat,
            args.gamma,
            device,
        )
        env_steps += steps
    returns_t = torch.as_tensor(returns, dtype=torch.float32, device=device)
    true_grad = least_squares_gradient(actions - policy_action[:, None], returns_t)
    critic_grad = critic_action_gradient(qf1, obs_t, policy_action)
    with torch.no_grad():
        q_values = q_at_actions(qf1, obs_t, actions)
    cos = cosine_similarity(critic_grad, true_grad)
    return {
        "obs": obs_t.cpu(), "episode_steps": torch.as_tensor(episode_steps), "actions": actions.cpu(),
        "returns": returns_t.cpu(), "q_values": q_values.cpu(), "critic_grad": critic_grad.cpu(),
        "true_grad": true_grad.cpu(), "cos": cos.float().cpu(), "env_steps": env_steps, "seconds": time.time() - start,
    }  # fmt: skip


def mean_cosine(cos: torch.Tensor) -> float:
    """Mean CS over the states where it is defined (paper Fig. 3d); NaN when it is defined nowhere."""
    defined = cos[~torch.isnan(cos)]
    return float(defined.mean()) if len(defined) else float("nan")


def log_probe(writer: SummaryWriter, probe: dict, step: int) -> None:
    cos = probe["cos"]
    defined = cos[~torch.isnan(cos)]
    writer.add_scalar("grad/cosine_similarity", mean_cosine(cos), step)
    for tau, fraction in zip(TAUS, learnable_fraction(cos, TAUS)):
        writer.add_scalar(f"grad/learnable_states_tau_{tau:g}", fraction, step)
    writer.add_scalar("grad/undefined_states", float(torch.isnan(cos).sum()), step)
    if len(defined):
        writer.add_histogram("grad/cosine_similarity_per_state", defined, step, bins=np.linspace(-1, 1, 21))
    writer.add_scalar("grad/probe_seconds", probe["seconds"], step)
    writer.add_scalar("grad/probe_env_steps", probe["env_steps"], step)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: TD3 (hyper_td3.py, without checkpoints).
def smoothed_target_action(target_actor: Actor, next_obs, policy_noise: float, noise_clip: float):
    """Target policy smoothing (TD3 paper Sec. 5.3, eq. 15): a' = clip(pi'(s') + clip(eps, -c, c), low, high) with
    eps ~ N(0, sigma^2), sigma and c in units of each dimension's action scale, each dimension clipped to its bounds."""
    action = target_actor(next_obs)
    noise = (torch.randn_like(action) * policy_noise).clamp(-noise_clip, noise_clip) * target_actor.action_scale
    low, high = (
        target_actor.action_bias - target_actor.action_scale,
        target_actor.action_bias + target_actor.action_scale,
    )
    return torch.max(torch.min(action + noise, high), low)


def td3_target(rewards, terminations, next_q1, next_q2, gamma):
    """Clipped double-Q target (TD3 paper eq. 10): y = r + gamma * (1 - terminated) * min(Q1', Q2')(s', a')."""
    return rewards + gamma * (1.0 - terminations) * torch.min(next_q1, next_q2)


def td3_actor_loss(actor: Actor, qf1: nn.Module, obs):
    """-Q1(s, pi(s)).mean(): the deterministic policy gradient through the first critic only (TD3 paper Alg. 1)."""
    pi = actor(obs)
    with frozen(qf1):
        return -qf1(obs, pi).mean()


def exploration_action(action: np.ndarray, noise_std: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """a + N(0, noise_std^2), independently per dimension, clipped to the bounds (TD3 paper Sec. 6.1)."""
    return np.clip(action + np.random.normal(0.0, noise_std), low, high).astype(np.float32)


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


def critic_lr(args: Args, critic_name: str) -> float:
    """The paper's tuned 5e-5 for hypernetwork critics, 3e-4 for the MLP, unless --q-lr is given."""
    return args.q_lr if args.q_lr is not None else (5e-5 if critic_name in HYPER_CRITICS else 3e-4)


class TD3:
    """The learner: deterministic actor, twin critics, target copies of all three, their Adam optimizers, and the
    count of critic updates that times the delayed actor updates. `update` is one TD3 update (TD3 paper, Alg. 1)."""

    NETS = ("actor", "qf1", "qf2", "actor_target", "qf1_target", "qf2_target")

    def __init__(self, args: Args, critic_name: str, obs_dim: int, act_dim: int, action_low, action_high,
                 meta_samples, device):  # fmt: skip
        self.args = args
        self.actor = Actor(obs_dim, act_dim, action_low, action_high).to(device)
        self.qf1 = make_critic(critic_name, vars(args), obs_dim, act_dim, meta_samples).to(device)
        self.qf2 = make_critic(critic_name, vars(args), obs_dim, act_dim, meta_samples).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.qf1_target = copy.deepcopy(self.qf1).requires_grad_(False)
        self.qf2_target = copy.deepcopy(self.qf2).requires_grad_(False)
        self.q_optimizer = adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=critic_lr(args, critic_name))
        self.actor_optimizer = adam(self.actor.parameters(), lr=args.policy_lr)
        self.critic_updates, self.last_actor_loss = 0, None  # the policy delay counts critic updates

    def update(self, obs, actions, rewards, next_obs, terminations) -> dict:
        """A critic step on one minibatch; every --policy-frequency critic steps also an actor step and the target
        updates. Returns the losses and values for logging (actor_loss: the latest actor step's)."""
        args = self.args
        with torch.no_grad():
            next_actions = smoothed_target_action(self.actor_target, next_obs, args.policy_noise, args.noise_clip)
            next_q1, next_q2 = self.qf1_target(next_obs, next_actions), self.qf2_target(next_obs, next_actions)
            target = td3_target(rewards, terminations, next_q1, next_q2, args.gamma)
        qf1_values, qf2_values = self.qf1(obs, actions), self.qf2(obs, actions)
        qf1_loss, qf2_loss = F.mse_loss(qf1_values, target), F.mse_loss(qf2_values, target)
        guarded_step(self.q_optimizer, qf1_loss + qf2_loss, "critic", qf1_loss=qf1_loss, qf2_loss=qf2_loss)
        self.critic_updates += 1

        if self.critic_updates % args.policy_frequency == 0:  # delayed actor and target updates (TD3 paper Sec. 5.2)
            actor_loss = td3_actor_loss(self.actor, self.qf1, obs)
            guarded_step(self.actor_optimizer, actor_loss, "actor", actor_loss=actor_loss)
            self.last_actor_loss = actor_loss.detach()  # stays on the device; read only when logged
            polyak_update(self.actor, self.actor_target, args.tau)
            polyak_update(self.qf1, self.qf1_target, args.tau)
            polyak_update(self.qf2, self.qf2_target, args.tau)

        metrics = {"qf1_values": qf1_values.mean(), "qf2_values": qf2_values.mean(), "qf1_loss": qf1_loss,
                   "qf2_loss": qf2_loss, "qf_loss": (qf1_loss + qf2_loss) / 2.0}  # fmt: skip
        if self.last_actor_loss is not None:
            metrics["actor_loss"] = self.last_actor_loss
        return metrics

    def models(self) -> dict:
        """Actor, critics and their targets: what a saved model holds, enough to probe it again."""
        return {name: getattr(self, name).state_dict() for name in self.NETS}


class ReplayBuffer:
    """Uniform replay of (s, a, r, s', terminated) in numpy with its own RNG."""

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


def evaluate(actor: Actor, env: gym.Env, episodes: int, seed: int, device) -> list:
    """Undiscounted returns of the deterministic actor on an env reseeded with `seed` at every call; no random number
    is drawn, so evaluating does not change training."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        episodic_return, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy_actions(actor, obs[None], device)[0])
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
        if len(returns) < episodes:
            obs, _ = env.reset()
    return returns


def collect_meta_samples(critic: str, env_id: str, n: int, seed: int) -> torch.Tensor:
    """Meta-variable samples for the pytorch init: random-action states (sa-hyper) or random actions (as-hyper),
    from a separately seeded env."""
    env = make_env(env_id)
    env.action_space.seed(seed)
    if critic == "as-hyper":
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


def train_and_probe(args: Args, critic_name: str, run_dir: str, results: dict, stop: "StopRequest", device) -> None:
    """One TD3 run with `critic_name`, probing every args.probe_freq steps. The probe uses its own envs and RNG,
    so a run with probes trains exactly as one without."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env, eval_env = make_env(args.env_id), make_env(args.env_id)
    probe_envs = [make_env(args.env_id) for _ in range(max(args.probe_states, args.probe_actions))]
    max_episode_steps = env.spec.max_episode_steps
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    action_low, action_high = env.action_space.low, env.action_space.high
    exploration_std = args.exploration_noise * (action_high - action_low) / 2.0
    env.action_space.seed(args.seed)

    meta_samples = None
    if critic_name in HYPER_CRITICS and args.hyper_init == "pytorch":
        meta_samples = collect_meta_samples(critic_name, args.env_id, args.hyper_init_samples, args.seed + 200)
    with out_of_memory_fails("the networks and the replay buffer"):
        agent = TD3(args, critic_name, obs_dim, act_dim, action_low, action_high, meta_samples, device)
        rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, args.seed)
    writer = open_writer(args, run_dir, critic_name)
    n_params = sum(p.numel() for p in agent.qf1.parameters())
    print(
        f"{critic_name}: {n_params:,} parameters per Q-network, q_lr {critic_lr(args, critic_name):g}, device {device}"
    )

    obs, _ = env.reset(seed=args.seed)
    episodic_return, episodic_length, probe_seconds = 0.0, 0, 0.0
    progress = Progress(critic_name, args.total_timesteps, 0, args.learning_starts)
    start_time, global_step = time.time(), 0
    try:
        for global_step in range(1, args.total_timesteps + 1):
            if global_step <= args.learning_starts:
                action = env.action_space.sample()
            else:
                action = exploration_action(policy_actions(agent.actor, obs[None], device)[0], exploration_std,
                                            action_low, action_high)  # fmt: skip
            next_obs, reward, terminated, truncated, _ = env.step(action)
            episodic_return += float(reward)
            episodic_length += 1
            rb.add(obs, next_obs, action, reward, terminated)  # true final obs even on truncation: no autoreset
            obs = next_obs
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
                progress.last_return, episodic_return, episodic_length = episodic_return, 0.0, 0
                obs, _ = env.reset()

            if global_step > args.learning_starts:
                metrics = agent.update(*rb.sample(args.batch_size, device))
                if global_step % 100 == 0:
                    for name, value in metrics.items():
                        writer.add_scalar(f"losses/{name}", value.item(), global_step)

            if args.probe_freq and global_step % args.probe_freq == 0:
                rng = np.random.default_rng([args.seed, global_step])
                probe = run_probe(probe_envs, agent.actor, agent.qf1, agent.qf1_target, agent.qf2_target, args, rng,
                                  max_episode_steps, device)  # fmt: skip
                probe_seconds += probe["seconds"]
                log_probe(writer, probe, global_step)
                results["probes"].append({"critic": critic_name, "step": global_step, **probe})
                save_results(results)
                progress.last_cos = mean_cosine(probe["cos"])
            if args.eval_freq and global_step % args.eval_freq == 0:
                returns = evaluate(agent.actor, eval_env, args.eval_episodes, args.seed + 100, device)
                progress.last_eval = float(np.mean(returns))
                writer.add_scalar("eval/episodic_return", progress.last_eval, global_step)
                results["evals"].append({"critic": critic_name, "step": global_step, "return": progress.last_eval})
                save_results(results)
            if global_step % 100 == 0:
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            if global_step % args.progress_freq == 0 or global_step == args.total_timesteps:
                progress.print(global_step)
            if global_step == args.learning_starts:
                progress.new_phase(global_step)  # from here the rate, and so the ETA, is that of learning steps
            if stop.requested:
                exit_interrupted(writer, args, critic_name, global_step, results)
    except NonFinite as e:
        exit_non_finite(writer, e, critic_name, global_step, results)

    elapsed = format_duration(time.time() - start_time)
    print(f"{critic_name}: {args.total_timesteps} steps in {elapsed}, of which probes {format_duration(probe_seconds)}")
    if args.save_model:
        path = os.path.join(run_dir, critic_name, f"{args.exp_name}.cleanrl_model")
        save_models(path, {**vars(args), "critic": critic_name}, args.total_timesteps, agent)
        print(f"model saved to {path}; probe it again with: python {SCRIPT} --snapshots {path}")
    for e in (env, eval_env, *probe_envs):
        e.close()
    writer.close()


def probe_snapshots(args: Args, files: list, run_dir: str, results: dict, stop: "StopRequest", device) -> None:
    """Probe saved models (hyper_td3.py --save-model [--snapshot-freq N], or this script's --save-model) without
    training."""
    writers, pools = {}, {}
    for done, path in enumerate(files):
        saved = load_file(path, kinds=("model",), formats=SNAPSHOT_FORMATS)
        config, step, name = saved["args"], saved["global_step"], saved["args"].get("critic")
        if name not in ("sa-hyper", "as-hyper", "mlp"):
            fail(f"{path}: grad_probe.py knows the sa-hyper, as-hyper and mlp critics, not {name!r}")
        env_id = config["env_id"]
        if env_id not in pools:
            pools[env_id] = [make_env(env_id) for _ in range(max(args.probe_states, args.probe_actions))]
        envs = pools[env_id]
        check_probe_size(args, envs[0])
        obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
        actor = Actor(obs_dim, act_dim, envs[0].action_space.low, envs[0].action_space.high).to(device)
        qf1, qf1_target, qf2_target = (make_critic(name, config, obs_dim, act_dim).to(device) for _ in range(3))
        load_models(path, saved, {"actor": actor, "qf1": qf1, "qf1_target": qf1_target, "qf2_target": qf2_target})
        rng = np.random.default_rng([args.seed, step])
        probe = run_probe(envs, actor, qf1, qf1_target, qf2_target, args, rng, envs[0].spec.max_episode_steps, device)
        if name not in writers:
            writers[name] = open_writer(args, run_dir, name)
        log_probe(writers[name], probe, step)
        results["probes"].append({"critic": name, "step": step, "source": path, **probe})
        save_results(results)
        learnable = learnable_fraction(probe["cos"], [0.0])[0]
        print(f"{path}: {name} step {step} | CS {mean_cosine(probe['cos']):.3f} | learnable (CS > 0) {learnable:.2f} | "
              f"{probe['env_steps']} env steps in {probe['seconds']:.1f} s")  # fmt: skip
        if stop.requested and done + 1 < len(files):
            for writer in writers.values():
                writer.close()
            print(f"interrupted after probing {done + 1} of {len(files)} snapshots; their results are kept in "
                  f"{results['path']}", file=sys.stderr)  # fmt: skip
            sys.exit(130)
    for writer in writers.values():
        writer.close()


# ---------------------------------------------------------------------------------------------------------------
# Figures (paper Fig. 3 a-d and Fig. 4) from one or more results files.
def plot_results(results_list: list, out_dir: str) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib (or the project's 'plot' extra)")
    probes = [p for r in results_list for p in r["probes"]]
    evals = [e for r in results_list for e in r["evals"]]
    critics = list(dict.fromkeys([p["critic"] for p in probes] + [e["critic"] for e in evals]))
    env_ids = ", ".join(sorted({r["env_id"] for r in results_list}))
    written = []
    if probes:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        taus = np.linspace(0, 1, 51)
        for critic in critics:
            mine = sorted((p for p in probes if p["critic"] == critic), key=lambda p: p["step"])
            if not mine:
                continue
            steps = [p["step"] for p in mine]
            pooled = torch.cat([p["cos"] for p in mine])
            axes[0].plot(taus, learnable_fraction(pooled, taus), label=critic)
            for ax, tau in ((axes[1], 0.2), (axes[2], 0.6)):
                ax.plot(steps, [learnable_fraction(p["cos"], [tau])[0] for p in mine], marker=".", label=critic)
            axes[3].plot(steps, [mean_cosine(p["cos"]) for p in mine], marker=".", label=critic)
        titles = ("(a) learnable states vs threshold", "(b) learnable states, CS > 0.2",
                  "(c) learnable states, CS > 0.6", "(d) mean cosine similarity")  # fmt: skip
        xlabels, ylabels = ("tau", "step", "step", "step"), ("fraction with CS > tau", "fraction", "fraction", "CS")
        for ax, title, xlabel, ylabel in zip(axes, titles, xlabels, ylabels):
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[3].axhline(0.0, color="k", lw=0.5)
        axes[0].legend()
        fig.suptitle(f"Action-gradient accuracy ({env_ids})")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "fig3_gradient_accuracy.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for critic in critics:
            mine = sorted((e for e in evals if e["critic"] == critic), key=lambda e: e["step"])
            if mine:
                ax.plot([e["step"] for e in mine], [e["return"] for e in mine], marker=".", label=critic)
        ax.set_title(f"(Fig. 4) learning curves ({env_ids})")
        ax.set_xlabel("step")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out_dir, "fig4_learning_curves.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# ======================================================================================================================
# RUN INFRASTRUCTURE: not the algorithm. Argument checks, the run directory, verified results and model files, the
# non-finite guard, Ctrl-C, the progress line.
# ======================================================================================================================
SCRIPT = "grad_probe.py"
FILE_FORMAT = "grad_probe/2"  # results files and models carry it; files of other scripts or versions are refused
SNAPSHOT_FORMATS = (FILE_FORMAT, "hyper_td3/2")  # --snapshots probes this script's models and hyper_td3.py's


def fail(message: str, code: int = 1) -> None:
    """One clear error line and a non-zero exit, instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_args(args: Args) -> None:
    positive = ["total_timesteps", "buffer_size", "batch_size", "eval_episodes", "progress_freq", "policy_frequency",
                "probe_states", "probe_actions", "action_repeat", "probe_start_steps", "hyper_embedding_dim",
                "hyper_dynamic_hidden", "hyper_init_samples"]  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    non_negative = ["seed", "learning_starts", "eval_freq", "probe_freq", "hyper_blocks", "num_threads", "probe_sigma",
                    "policy_noise", "noise_clip", "exploration_noise"]  # fmt: skip
    for name in non_negative:
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
    if args.batch_size > args.buffer_size or args.batch_size > max(args.learning_starts, 1):
        fail(f"--batch-size {args.batch_size} must not exceed --buffer-size {args.buffer_size} or "
             f"--learning-starts {args.learning_starts}")  # fmt: skip
    if not 0.0 < args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        fail(f"--gamma and --tau must be in (0, 1], got {args.gamma} and {args.tau}")
    for name in ["policy_lr", "q_lr", "hyper_embedding_norm", "hyper_weight_scale"]:
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ["policy_lr", "q_lr"]:  # Adam's first step is lr / (1 - beta1) = 10 lr, a float32 in torch
        value = getattr(args, name)
        if value is not None and 10 * value > torch.finfo(torch.float32).max:
            fail(f"--{name.replace('_', '-')} must be below 3.4e37 (Adam's first step, 10 lr, must fit a float32)")
    if not args.critics and not args.snapshots and not args.plot_from:
        fail("--critics is empty: name at least one of sa-hyper, as-hyper, mlp")
    if args.probe_sigma == 0:
        fail("--probe-sigma 0 leaves every action equal, so there is nothing to fit a gradient to")
    if not args.exp_name or os.sep in args.exp_name or (os.altsep and os.altsep in args.exp_name):
        fail(f"--exp-name must be a plain name (it becomes part of a directory name), got {args.exp_name!r}")
    if args.plot or args.plot_from:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail('--plot and --plot-from need matplotlib: pip install -e ".[plot]"')


def check_probe_size(args: Args, env: gym.Env) -> None:
    act_dim = env.action_space.shape[0]
    if args.probe_actions < act_dim + 2:
        fail(f"--probe-actions {args.probe_actions} is too few for {act_dim} action dimensions: a least-squares slope "
             f"with intercept needs at least {act_dim + 2} returns per state")  # fmt: skip


def check_memory(args: Args, env: gym.Env, replay_buffer: bool) -> None:
    """Refuse sizes beyond the machine's memory before allocating them: the replay buffer (numpy would allocate it
    lazily and the run would be killed once it fills) and the probe's max(states, actions) MuJoCo environments."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    u = env.unwrapped
    env_bytes = u.model.nbuffer + u.data.nbuffer if hasattr(u, "model") and hasattr(u.model, "nbuffer") else 0
    needed = {"the probe's environments": max(args.probe_states, args.probe_actions) * env_bytes}
    if replay_buffer:
        needed["the replay buffer"] = args.buffer_size * 4 * (2 * obs_dim + act_dim + 2)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    for what, size in needed.items():
        if memory and size > memory:
            fail(f"these sizes need {size / 2**30:.1f} GiB for {what}; this machine has {memory / 2**30:.1f} GiB")


class Progress:
    """The console line every --progress-freq steps: critic, step, steps/s and ETA over the current phase (random
    actions, then learning; the first is much faster, so it gives no ETA), the latest training and evaluation returns
    and mean CS."""

    def __init__(self, label: str, total_steps: int, step: int, learning_starts: int):
        self.label, self.total_steps, self.learning_starts = label, total_steps, learning_starts
        self.last_return, self.last_eval, self.last_cos = float("nan"), float("nan"), float("nan")
        self.new_phase(step)

    def new_phase(self, step: int) -> None:
        self.since_time, self.since_step = time.time(), step

    def print(self, step: int) -> None:
        rate = (step - self.since_step) / max(time.time() - self.since_time, 1e-9)
        self.new_phase(step)
        eta = format_duration((self.total_steps - step) / max(rate, 1e-9))
        if step <= self.learning_starts < self.total_steps:
            eta = "after learning starts"  # the random steps' rate says nothing about the learning steps'
        fields = [f"{self.label} step {step}/{self.total_steps}", f"{rate:.1f} steps/s", f"ETA {eta}"]
        latest = (("return", self.last_return, 1), ("eval", self.last_eval, 1), ("CS", self.last_cos, 3))
        fields += [f"{name} {value:.{digits}f}" for name, value, digits in latest if np.isfinite(value)]
        print(" | ".join(fields), flush=True)


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
    """SHA-256 over every tensor's bytes and every plain value of a nested file, in a fixed order (the same function
    as hyper_td3.py's, so its models verify here)."""
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
    """Write a results file or model: tensors and plain containers only (so it loads with
    torch.load(weights_only=True)), with its format, kind and a digest of its contents. Written to a temporary file,
    flushed to disk, then renamed over `path`: a crash or a full disk mid-write leaves the previous file intact."""
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


def load_file(path: str, kinds: tuple, formats: tuple = (FILE_FORMAT,)) -> dict:
    """Load a file written by save_file (this script's, or hyper_td3.py's for `formats` naming it) without running
    any code from it (weights_only), and refuse anything else: another script's or version's file, a corrupted one
    (its digest differs), or one of another kind."""
    writers = " or ".join(f"{fmt.split('/')[0]}.py" for fmt in formats)
    what = f"a {' or '.join(kinds)} file written by {writers}"
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"cannot load {path}: no such file")
    except Exception as e:  # unpickling errors, foreign pickles, truncated or random bytes: all end the same way
        fail(f"cannot load {path}: not {what} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(contents, dict) or contents.get("format") not in formats:
        fail(f"cannot load {path}: not {what}, or written by an older version")
    digest = contents.pop("sha256", None)
    if digest != content_digest(contents):
        fail(f"cannot load {path}: its contents do not match their checksum (the file is corrupted)")
    if contents.get("kind") not in kinds:
        fail(f"cannot load {path}: it is a {contents.get('kind')} file, expected {what}")
    return contents


def load_models(path: str, saved: dict, modules: dict) -> None:
    """Load the saved state dicts into `modules` (name -> module); one error line if they do not fit."""
    try:
        for key, module in modules.items():
            module.load_state_dict(saved[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        fail(f"{path}: the saved networks do not fit their own settings: {str(e).splitlines()[0][:200]}")


def save_models(path: str, config: dict, global_step: int, agent: TD3) -> None:
    """A final model: actor, critics and their targets, in the layout of hyper_td3.py's models (--snapshots reads
    both)."""
    save_file({"args": config, "global_step": global_step, **agent.models()}, path, kind="model")


def save_results(results: dict) -> None:
    """Rewrite the results file (after every probe and evaluation)."""
    save_file(results, results["path"], kind="results")


def load_results(path: str) -> dict:
    return load_file(path, kinds=("results",))


def snapshot_files(paths) -> list:
    """Expand directories into their *.cleanrl_model files; order by the step number in the name."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, "*.cleanrl_model"))
            if not found:
                fail(f"{path} holds no .cleanrl_model files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            fail(f"no such file or directory: {path}")

    def step(f):
        return int(m.group(1)) if (m := re.search(r"step_(\d+)", os.path.basename(f))) else sys.maxsize

    return sorted(files, key=lambda f: (step(f), f))


def make_run_dir(args: Args, env_id: str) -> tuple:
    """A new directory runs/{env}__{exp_name}__{critics}__{seed}__{unix time} ("snapshots" in place of the critics
    with --snapshots), suffixed -1, -2, ... when runs started in the same second took the name (mkdir is atomic, so
    two runs never share one)."""
    env_name = env_id.replace("/", "-").replace(":", "-")
    critics = "snapshots" if args.snapshots else "+".join(args.critics)
    base = f"{env_name}__{args.exp_name}__{critics}__{args.seed}__{int(time.time())}"
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


class StopRequest:
    """Ctrl-C (SIGINT) asks the run to stop at the end of the current step (or snapshot), where the results file is
    up to date; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            fail("interrupted twice; stopped at once (the results file holds the probes finished before)", code=130)
        self.requested = True
        print("stopping at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def out_of_memory_fails(what: str):
    """A failed allocation (MemoryError, or torch's RuntimeError) ends the run with one error line."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "alloc" not in str(e):
            raise
        fail(f"not enough memory for {what} at these sizes ({type(e).__name__})")


def open_writer(args: Args, run_dir: str, critic_name: str) -> SummaryWriter:
    """The critic's TensorBoard writer in runs/{run_name}/{critic}/, the hyperparameter table first."""
    writer = SummaryWriter(os.path.join(run_dir, critic_name))
    settings = {**vars(args), "critic": critic_name, "q_lr (effective)": critic_lr(args, critic_name)}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))
    return writer


def exit_interrupted(writer: SummaryWriter, args: Args, critic_name: str, step: int, results: dict) -> None:
    """Ctrl-C: keep what is done (the results file, the TensorBoard logs, earlier critics' models) and say so."""
    writer.close()
    save_results(results)
    remaining = args.critics[args.critics.index(critic_name) :]
    print(f"interrupted at step {step} of the {critic_name} run; its probes and evaluations so far, and those of the "
          f"critics before it, are kept in {results['path']}; grad_probe.py cannot resume a run: train the critics "
          f"still to do with --critics {' '.join(remaining)}", file=sys.stderr)  # fmt: skip
    sys.exit(130)


def exit_non_finite(writer: SummaryWriter, error: NonFinite, critic_name: str, step: int, results: dict) -> None:
    writer.close()
    fail(
        f"{critic_name}: {error} at step {step}; stopping, the results of earlier probes are kept in {results['path']}"
    )


def plot_saved_results(args: Args) -> None:
    """--plot-from: draw the figures from saved results files, without training."""
    results_list = [load_results(path) for path in args.plot_from]
    out_dir = args.plot_dir or os.path.dirname(os.path.abspath(args.plot_from[0]))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --plot-dir {out_dir}: {e.strerror or e}")
    for path in plot_results(results_list, out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.plot_from:
        plot_saved_results(args)
        sys.exit(0)
    stop = StopRequest()

    # what to probe: saved models (their environment), or the critics trained here on --env-id
    env_id, files = args.env_id, []
    if args.snapshots:
        files = snapshot_files(args.snapshots)
        env_id = load_file(files[0], kinds=("model",), formats=SNAPSHOT_FORMATS)["args"]["env_id"]
    env = make_env(env_id)
    check_probe_size(args, env)
    check_memory(args, env, replay_buffer=not args.snapshots)
    env.close()

    run_name, run_dir = make_run_dir(args, env_id)
    results = {"args": vars(args), "env_id": env_id, "path": os.path.join(run_dir, "grad_probe.pt"), "probes": [],
               "evals": []}  # fmt: skip
    save_results(results)
    print(f"{run_name}: results go to {results['path']}")
    if args.snapshots:
        probe_snapshots(args, files, run_dir, results, stop, device)
    else:
        for critic_name in args.critics:
            train_and_probe(args, critic_name, run_dir, results, stop, device)
    save_results(results)
    print(f"results written to {results['path']}; reload with torch.load(path, weights_only=True)")
    if args.plot:
        for path in plot_results([results], run_dir):
            print(f"wrote {path}")
