import os
import subprocess
import sys

import numpy as np
import pytest

from hyper_maml import (FAMILIES, FAMILY_SPECS, Task, ant_is_healthy, family_spec, make_task_env, make_task_pool,
                        task_context)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = 0.05
# Ant's is mild so that it keeps its feet on the floor and the contact term is non-zero
ACTION = {"HalfCheetah": np.array([0.3, -0.7, 0.5, 0.9, -0.2, 0.1]), "Ant": np.linspace(0.2, -0.3, 8)}
ROBOT = {family: FAMILY_SPECS[family].robot for family in FAMILIES}


def cheetah_state(env):
    qpos, qvel = env.unwrapped.init_qpos.copy(), env.unwrapped.init_qvel.copy()
    qvel[0] = 2.0  # running forward at 2 m/s
    return qpos, qvel


def ant_state(env):
    """A landed ant (feet on the floor, so contact forces are non-zero) moving forward at about 1 m/s."""
    env.reset(seed=0)
    for _ in range(30):
        env.step(np.zeros(8))
    qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
    qvel[0] = 1.0
    return qpos, qvel


def step_from(env, state, action):
    """Step from a fixed MuJoCo state; returns the step's outputs and the hand-computed x velocity and contact sum."""
    env.reset(seed=0)
    env.unwrapped.set_state(*state)
    data = env.unwrapped.data
    torso_x = lambda: data.body("torso").xpos[0] if env.family_spec.robot == "Ant" else data.qpos[0]  # noqa: E731
    x_before = float(torso_x())
    obs, reward, terminated, truncated, info = env.step(action)
    velocity = (float(torso_x()) - x_before) / DT
    contact = np.sum(np.clip(data.cfrc_ext, -1.0, 1.0) ** 2)
    return reward, velocity, contact, obs, terminated


def expected_reward(family, goal, velocity, action, contact):
    clipped = np.clip(action, -1.0, 1.0)
    if family == "HalfCheetahFwdBack":
        return goal * velocity - 0.05 * np.sum(clipped**2)
    if family in ("HalfCheetahVel", "HalfCheetahVelMedium"):
        return -abs(velocity - goal) - 0.05 * np.sum(clipped**2)
    if family == "AntFwdBack":
        return goal * velocity - 0.005 * np.sum(clipped**2) - 0.5e-3 * contact + 0.05
    assert family == "AntVel"
    return (-abs(velocity - goal) + 1.0) - 0.005 * np.sum(clipped**2) - 0.5e-3 * contact + 0.05


def state_for(env):
    return ant_state(env) if env.family_spec.robot == "Ant" else cheetah_state(env)


# --- rewards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,goal", [("HalfCheetahFwdBack", 1.0), ("HalfCheetahFwdBack", -1.0), ("AntFwdBack", 1.0),
                                         ("AntFwdBack", -1.0), ("HalfCheetahVel", 0.4), ("HalfCheetahVel", 2.9),
                                         ("HalfCheetahVelMedium", 2.7), ("AntVel", 0.3), ("AntVel", 2.8)])  # fmt: skip
def test_reward_equals_the_familys_formula(family, goal):
    env = make_task_env(family, Task(goal))
    action = ACTION[ROBOT[family]]
    reward, velocity, contact, _, _ = step_from(env, state_for(env), action)
    assert abs(velocity) > 0.5  # the state really moves, so the velocity term is tested
    if ROBOT[family] == "Ant":
        assert 0.5e-3 * contact > 1e-6  # feet on the floor, so the contact term is tested
    assert reward == pytest.approx(expected_reward(family, goal, velocity, action, contact), abs=1e-9, rel=0)


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntFwdBack"])
def test_direction_sign_flips_the_velocity_term(family):
    env = make_task_env(family, Task(1.0))
    state, action = state_for(env), ACTION[ROBOT[family]]
    forward, velocity, _, obs_forward, _ = step_from(env, state, action)
    env.set_task(Task(-1.0))
    backward, _, _, obs_backward, _ = step_from(env, state, action)
    np.testing.assert_array_equal(obs_forward, obs_backward)  # same physics, only the reward changes
    assert forward - backward == pytest.approx(2.0 * velocity, abs=1e-9, rel=0)


def test_ant_fwd_back_rewards_x_not_a_one_radian_heading():
    env = make_task_env("AntFwdBack", Task(1.0))
    qpos, qvel = ant_state(env)
    qvel[:2] = (0.0, 2.0)  # moving sideways along y: the authors' +-1 rad task would pay 0.84 * v_y for it
    reward, velocity, contact, _, _ = step_from(env, (qpos, qvel), np.zeros(8))
    assert abs(velocity) < 0.2
    assert reward == pytest.approx(velocity - 0.5e-3 * contact + 0.05, abs=1e-9, rel=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_control_cost_is_that_of_the_clipped_action(family):
    env = make_task_env(family, Task(1.0))
    state, size = state_for(env), ACTION[ROBOT[family]].size
    reward_clipped, _, _, obs_clipped, _ = step_from(env, state, np.ones(size))
    reward_large, _, _, obs_large, _ = step_from(env, state, np.full(size, 2.0))
    np.testing.assert_array_equal(obs_clipped, obs_large)
    assert reward_large == reward_clipped
    reward_zero, velocity_zero, contact_zero, _, _ = step_from(env, state, np.zeros(size))
    assert reward_zero == pytest.approx(expected_reward(family, 1.0, velocity_zero, np.zeros(size), contact_zero), abs=1e-9)


# --- episodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("z,vz,terminated", [(0.55, 0.0, False), (0.21, -1.0, True), (1.3, 0.0, True)])
def test_ant_terminates_when_torso_z_leaves_its_range(z, vz, terminated):
    for family in ("AntFwdBack", "AntVel"):
        env = make_task_env(family, Task(1.0))
        model = env.unwrapped.model
        model.geom_contype[0] = model.geom_conaffinity[0] = 0  # no floor, so the torso can sink below z = 0.2
        qpos, qvel = env.unwrapped.init_qpos.copy(), np.zeros(model.nv)
        qpos[2], qvel[2] = z, vz
        done = step_from(env, (qpos, qvel), np.zeros(8))[4]
        z_after = env.unwrapped.data.qpos[2]
        assert bool(z_after < 0.2 or z_after > 1.0) is terminated
        assert done is terminated


def test_ant_health_needs_torso_z_in_range_and_a_finite_state():
    qpos, qvel = np.zeros(15), np.zeros(14)
    for z, healthy in [(0.19, False), (0.2, True), (0.5, True), (1.0, True), (1.01, False)]:
        qpos[2] = z
        assert ant_is_healthy(qpos, qvel) is healthy
    qpos[2] = 0.5
    qvel[3] = np.nan
    assert not ant_is_healthy(qpos, qvel)
    qvel[3], qpos[7] = 0.0, np.inf
    assert not ant_is_healthy(qpos, qvel)


def test_half_cheetah_never_terminates_even_upside_down():
    env = make_task_env("HalfCheetahVel", Task(1.0))
    qpos, qvel = cheetah_state(env)
    qpos[1], qpos[2] = -0.4, np.pi  # low and flipped over
    assert step_from(env, (qpos, qvel), np.zeros(6))[4] is False


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntVel"])
def test_episodes_are_truncated_after_200_steps(family):
    env = make_task_env(family, Task(1.0))
    env.reset(seed=0)
    size = ACTION[ROBOT[family]].size
    flags = [env.step(np.zeros(size))[2:4] for _ in range(200)]
    assert flags[:-1] == [(False, False)] * 199
    assert flags[-1] == (False, True)


@pytest.mark.parametrize("family,obs_size", [("HalfCheetahFwdBack", 17), ("HalfCheetahVelMedium", 17), ("AntVel", 27)])
def test_observations_are_gymnasiums(family, obs_size):
    env = make_task_env(family, Task(1.0))
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (obs_size,)
    assert env.step(np.zeros(env.action_space.shape))[0].shape == (obs_size,)


def test_set_task_refuses_a_goal_of_the_wrong_kind():
    env = make_task_env("HalfCheetahFwdBack", Task(1.0))
    with pytest.raises(ValueError, match="direction"):
        env.set_task(Task(0.5))
    with pytest.raises(ValueError, match="velocity"):
        make_task_env("AntVel", Task(float("nan")))


# --- task pools and context -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_task_pools_are_deterministic_per_seed_with_the_right_sizes(family):
    train, test = make_task_pool(family, seed=3)
    assert (len(train), len(test)) == (100, 20)
    assert make_task_pool(family, seed=3) == (train, test)
    assert make_task_pool(family, seed=4) != (train, test)
    assert make_task_pool(family, seed=3, n_train=7, n_test=20) == (train[:7], test)  # test tasks do not depend on n_train
    assert all(isinstance(task.goal, float) for task in train + test)


@pytest.mark.parametrize("family", ["HalfCheetahFwdBack", "AntFwdBack"])
def test_direction_pools_draw_both_directions_for_train_and_test(family):
    train, test = make_task_pool(family, seed=0)
    for pool in (train, test):
        goals = [task.goal for task in pool]
        assert set(goals) == {-1.0, 1.0}
    assert 35 <= sum(task.goal == 1.0 for task in train) <= 65


@pytest.mark.parametrize("family,train_range,test_range", [("HalfCheetahVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("AntVel", (0.0, 3.0), (0.0, 3.0)),
                                                           ("HalfCheetahVelMedium", (0.0, 2.5), (2.5, 3.0))])  # fmt: skip
def test_velocity_pools_lie_in_their_ranges(family, train_range, test_range):
    train, test = make_task_pool(family, seed=0)
    for pool, (low, high) in ((train, train_range), (test, test_range)):
        goals = np.array([task.goal for task in pool])
        assert np.all((goals >= low) & (goals < high))
        assert goals.max() - goals.min() > 0.6 * (high - low)  # spread over the range, not a constant


def test_direction_context_is_the_direction():
    for family in ("HalfCheetahFwdBack", "AntFwdBack"):
        for goal in (-1.0, 1.0):
            context = task_context(family, Task(goal))
            assert context.dtype == np.float32 and context.shape == (1,)
            assert context[0] == goal


def test_velocity_context_maps_zero_to_three_onto_minus_one_to_one():
    for family in ("HalfCheetahVel", "AntVel", "HalfCheetahVelMedium"):
        contexts = [task_context(family, Task(v))[0] for v in (0.0, 1.5, 2.5, 3.0)]
        assert contexts == pytest.approx([-1.0, 0.0, 2.0 / 3.0, 1.0])
    for family in ("HalfCheetahVel", "AntVel"):
        train, test = make_task_pool(family, seed=0)
        contexts = np.array([task_context(family, task)[0] for task in train + test])
        assert np.all((contexts >= -1.0) & (contexts < 1.0))


def test_medium_test_contexts_fall_outside_the_train_context_range():
    train, test = make_task_pool("HalfCheetahVelMedium", seed=0)
    train_contexts = np.array([task_context("HalfCheetahVelMedium", task)[0] for task in train])
    test_contexts = np.array([task_context("HalfCheetahVelMedium", task)[0] for task in test])
    assert train_contexts.min() >= -1.0 and test_contexts.max() < 1.0
    assert test_contexts.min() > train_contexts.max()
    assert test_contexts.min() >= np.float32(2.0 / 3.0) - 1e-6


# --- errors and CLI ---------------------------------------------------------------------------


def test_families_are_the_papers_five():
    assert FAMILIES == ("HalfCheetahFwdBack", "AntFwdBack", "HalfCheetahVel", "AntVel", "HalfCheetahVelMedium")
    assert tuple(FAMILY_SPECS) == FAMILIES


@pytest.mark.parametrize("call", [lambda: family_spec("HopperVel"), lambda: make_task_pool("HopperVel", 0),
                                  lambda: task_context("HopperVel", Task(1.0)), lambda: make_task_env("HopperVel", Task(1.0))])  # fmt: skip
def test_unknown_family_fails_with_one_error_line(call, capsys):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: unknown task family 'HopperVel'") and "HalfCheetahVelMedium" in err


def test_script_says_training_is_not_implemented_yet():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "hyper_maml.py")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not implemented" in proc.stderr
