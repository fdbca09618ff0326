"""A node's role from the launcher's environment (stages/training/launch_env.py): torchrun, SLURM, a job spec,
LMPIPE_* variables and explicit flags, in the documented precedence."""

import os

import pytest

from stages.training.launch_env import NodeRole, first_host, from_environment, nodes_spanned

TORCHRUN = {"TORCHELASTIC_RUN_ID": "job7", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "head", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "gpu[07-10]"}


def test_one_node_when_nothing_is_set():
    assert from_environment({}) == NodeRole()


def test_torchrun_gives_the_node_rank_and_the_port_after_its_own():
    assert from_environment(TORCHRUN) == NodeRole(1, 2, "head:29401", "torchrun")


def test_torchrun_with_several_processes_per_node_is_refused():
    with pytest.raises(ValueError, match="--nproc-per-node 1"):
        from_environment(TORCHRUN | {"LOCAL_WORLD_SIZE": "4"})


def test_slurm_takes_the_task_rank_and_the_first_host():
    assert from_environment(SLURM) == NodeRole(2, 4, "gpu07:29500", "SLURM")
    assert from_environment(SLURM | {"MASTER_PORT": "6000"}).endpoint == "gpu07:6000"
    with pytest.raises(ValueError, match="--ntasks-per-node=1"):
        from_environment(SLURM | {"SLURM_LOCALID": "1"})


def test_torchrun_inside_slurm_wins():
    assert from_environment(SLURM | TORCHRUN).source == "torchrun"


def test_a_job_spec_and_the_overrides():
    spec = {"NODE_RANK": "3", "NNODES": "4", "MASTER_ADDR": "lmpipe-0.lmpipe"}
    role = from_environment(spec)
    assert (role.node_rank, role.num_nodes, role.endpoint) == (3, 4, "lmpipe-0.lmpipe:29500")
    assert role.source.startswith("job spec")
    assert from_environment({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "7"}) \
        .endpoint == "a:7"
    lmpipe = {"LMPIPE_NODE_RANK": "0", "LMPIPE_NUM_NODES": "4"}
    assert from_environment(spec | lmpipe) == NodeRole(0, 4, "lmpipe-0.lmpipe:29500", "LMPIPE_* variables")
    flags = from_environment(spec | lmpipe, node_rank=2, endpoint="h:1")
    assert flags == NodeRole(2, 4, "h:1", "--node-rank/--num-nodes/--rdzv-endpoint")


@pytest.mark.parametrize(("env", "message"), [({"NODE_RANK": "2", "NNODES": "2", "MASTER_ADDR": "a"}, "0..num_nodes"),
                                              ({"NODE_RANK": "1", "NNODES": "2"}, "rendezvous endpoint")])
def test_inconsistent_roles_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        from_environment(env)


@pytest.mark.parametrize(("nodelist", "host"), [("node[03-05,9],gpu1", "node03"), ("a1,a2", "a1"), ("solo", "solo"),
                                                ("n[7]", "n7")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_nodes_spanned_reads_train_num_nodes():
    from schemas.configs import ReferenceConfig, SAEConfig, TrainConfig

    assert nodes_spanned(ReferenceConfig(train=TrainConfig(num_nodes=3))) == 3
    assert nodes_spanned(SAEConfig()) == 1


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "reference.train.num_nodes=4", "--set", "reference.train.micro_batch_size=2"],
     "train_reference trains on train.num_nodes=4 nodes, but the run has 2"),
    (["--task-runner", "dask"], "--task-runner dask cannot be combined with several nodes"),
    (["--rdzv-endpoint", "head"], "need a rendezvous endpoint host:port"),
])
def test_lmpipe_run_refuses_a_multi_node_run_it_cannot_do(tmp_path, monkeypatch, capsys, extra, message):
    from flows.cli import main

    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    args = ["run", "--preset", "tiny", "--node-rank", "0", "--num-nodes", "2", "--rdzv-endpoint", "localhost:1"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert "LMPIPE_NODE_RANK" not in os.environ  # nothing installed before the checks passed
