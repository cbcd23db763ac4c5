"""Two-process gloo DDP on CPU: gathers, shuffle-BN, lockstep enqueue with gathered keys."""

import pytest
import torch
from yacs.config import CfgNode

from mcl_det.data.toy import make_toy_imagenet
from mcl_det.pretrain import distributed as du
from mcl_det.pretrain.checkpoint import unwrap
from mcl_det.pretrain.config import setup_pretrain_cfg


def _ddp_worker(cfg_yaml: str, out: str) -> None:
    from mcl_det.pretrain.engine import Trainer

    torch.set_num_threads(1)
    cfg = CfgNode.load_cfg(cfg_yaml)
    cfg.freeze()
    trainer = Trainer(cfg)
    c = unwrap(trainer.model)
    with torch.no_grad():  # twin members: their keys match iff the queues are aligned
        for m in c.members:
            m.load_state_dict(c.members[0].state_dict())
    trainer.train()
    r = du.get_rank()
    x = torch.arange(4.0).view(4, 1) + 10 * r
    xs, restore = du.batch_shuffle(x)
    torch.save(
        {
            "queues": c.queues.clone(),
            "ptr": int(c.queue_ptr),
            "conv1": c.members[0].encoder.conv1.weight.detach().clone(),
            "gather": du.concat_all_gather(x),
            "xs": xs,
            "back": du.batch_unshuffle(xs, restore),
            "x": x,
            "world": du.get_world_size(),
        },
        f"{out}/rank{r}.pt",
    )
    du.cleanup_distributed()


@pytest.mark.slow
def test_two_process_gloo_queues_identical_and_aligned(tmp_path):
    root = tmp_path / "data"
    make_toy_imagenet(root, num_classes=2, train_per_class=8, val_per_class=1, size=32)
    opts = {
        "DATA.ROOT": str(root),
        "DATA.IMAGE_SIZE": "32",
        "OUTPUT_DIR": str(tmp_path / "run"),
        "MODEL.QUEUE_SIZE": "32",
        "MODEL.DIM": "16",
        "SOLVER.IMS_PER_BATCH": "8",
        "SOLVER.MAX_ITER": "2",
        "MONITOR.EVAL_PERIOD": "0",
        "MONITOR.TENSORBOARD": "False",
        "MONITOR.PROGRESS": "False",
        "MODEL.SHUFFLE_BN_SPLITS": "1",
        "DATA.NUM_WORKERS": "0",
        "MODEL.ARCH": "resnet18",
        "SOLVER.EPOCH_SNAPSHOT_PERIOD": "0",  # one 0.28 GB checkpoint
    }
    opts = [x for kv in opts.items() for x in kv]
    cfg = setup_pretrain_cfg(None, opts, cohort=2)
    du.launch(_ddp_worker, 2, (cfg.dump(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # gathers and shuffle-BN
    assert torch.equal(r0["gather"].flatten(), torch.tensor([0.0, 1, 2, 3, 10, 11, 12, 13]))
    assert torch.equal(r0["back"], r0["x"]) and torch.equal(r1["back"], r1["x"])
    shuffled = torch.cat([r0["xs"], r1["xs"]]).flatten().sort().values
    assert torch.equal(shuffled, r0["gather"].flatten())
    # lockstep enqueue with gathered keys: 2 steps x 8 global keys, identical on both ranks
    assert r0["ptr"] == r1["ptr"] == 16
    assert torch.equal(r0["queues"], r1["queues"])
    assert torch.equal(r0["conv1"], r1["conv1"])  # DDP kept the replicas in sync
    # twin members saw the same images in the same columns
    assert torch.allclose(r0["queues"][0, :16], r0["queues"][1, :16], atol=1e-5)
