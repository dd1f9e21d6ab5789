"""common/metrics.py against a brute-force numpy computation (per-class pixel loops, no confusion matrix)."""
import math

import numpy as np
import pytest
import torch

from common.metrics import ConfusionMatrix


def brute_force(pairs, k, ignore=255):
    """Per class: I = #(pred==c & label==c), P = #(pred==c), L = #(label==c) over valid pixels of all images."""
    inter, area_p, area_l = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, label in pairs:
        pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
        keep = label != ignore
        pred, label = pred[keep], label[keep]
        for c in range(k):
            inter[c] += np.sum((pred == c) & (label == c))
            area_p[c] += np.sum(pred == c)
            area_l[c] += np.sum(label == c)
    union = area_p + area_l - inter
    iou = [inter[c] / union[c] if union[c] > 0 else math.nan for c in range(k)]
    acc = [inter[c] / area_l[c] if area_l[c] > 0 else math.nan for c in range(k)]  # mmseg's per-class accuracy

    def nanmean(v):
        v = [x for x in v if not math.isnan(x)]
        return sum(v) / len(v)
    return {"aAcc": inter.sum() / area_l.sum(), "mIoU": nanmean(iou), "IoU": iou, "mAcc": nanmean(acc), "Acc": acc}


def random_pairs(k, n, seed, absent=(), ignore_frac=0.2):
    g = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = g.integers(3, 9, size=2)  # images of different sizes, as the val split
        label = g.integers(0, k, size=(h, w))
        pred = np.where(g.random((h, w)) < 0.6, label, g.integers(0, k, size=(h, w)))  # 60% right, rest random
        for c in absent:  # classes never in label nor prediction
            label[label == c] = (c + 1) % k
            pred[pred == c] = (c + 2) % k
        ignore = g.random((h, w)) < ignore_frac
        label[ignore] = 255
        pred[ignore & (g.random((h, w)) < 0.5)] = 0  # what the net says on ignore pixels must not count
        pairs.append((pred, label))
    return pairs


@pytest.mark.parametrize("dtypes", [(torch.int64, torch.int64), (torch.int32, torch.uint8), (torch.int16, torch.int32)])
def test_against_brute_force_with_ignore_and_absent_classes(dtypes):
    k = 7
    pairs = random_pairs(k, n=5, seed=0, absent=(3, 5))
    cm = ConfusionMatrix(k, ignore_index=255)
    for pred, label in pairs:  # multiple updates accumulate
        cm.update(torch.from_numpy(pred).to(dtypes[0]), torch.from_numpy(label).to(dtypes[1]))
    res, ref = cm.compute(), brute_force(pairs, k)
    assert cm.mat.dtype == torch.int64 and cm.mat.shape == (k, k)
    assert math.isclose(res["aAcc"], ref["aAcc"], rel_tol=1e-12)
    assert math.isclose(res["mIoU"], ref["mIoU"], rel_tol=1e-12)  # not NaN although classes 3 and 5 are absent
    assert math.isclose(res["mAcc"], ref["mAcc"], rel_tol=1e-12)
    for key in ("IoU", "Acc"):
        for a, b in zip(res[key], ref[key]):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12)
    assert math.isnan(res["IoU"][3]) and math.isnan(res["IoU"][5])
    # rows are targets: row sums are label areas over valid pixels
    areas = np.bincount(np.concatenate([l[l != 255] for _, l in pairs]), minlength=k)
    assert cm.mat.sum(1).tolist() == areas.tolist()


def test_class_only_in_prediction_counts_with_zero_iou():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))  # class 2 predicted, never labelled
    res = cm.compute()
    assert res["IoU"][2] == 0.0 and math.isnan(res["IoU"][3])
    assert math.isclose(res["mIoU"], (1 + 0.5 + 0) / 3)
    assert math.isclose(res["aAcc"], 2 / 3)
    # Acc = I / L: class 2 is never labelled (NaN, left out of mAcc); class 1 has 1 of its 2 pixels right
    assert res["Acc"][:2] == [1.0, 0.5] and math.isnan(res["Acc"][2]) and math.isclose(res["mAcc"], 0.75)


def official_ade20k_miou(pairs, k, ignore=255):
    """The ADE20k scene-parsing benchmark's mean IoU (CSAILVision/sceneparsing demoEvaluation.m, transcribed from its
    formula): per-class areas summed over all images, IoU = I / (eps + U), then the plain mean over all k classes, so
    a class absent from prediction and label counts as 0."""
    inter, union = np.zeros(k), np.zeros(k)
    for pred, label in pairs:
        pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
        keep = label != ignore  # unlabelled pixels are not penalised there either
        pred, label = pred[keep], label[keep]
        for c in range(k):
            i = np.sum((pred == c) & (label == c))
            inter[c] += i
            union[c] += np.sum(pred == c) + np.sum(label == c) - i
    return float(np.mean(inter / (np.finfo(np.float64).eps + union)))


def test_subset_leaves_absent_classes_out_where_the_official_ade20k_metric_counts_them_as_zero():
    # a val subset in which classes 1 and 4 never occur: our (ssseg's, mmseg's) mean is over the 5 present classes
    k = 7
    pairs = random_pairs(k, n=4, seed=2, absent=(1, 4))
    cm = ConfusionMatrix(k)
    for pred, label in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    ours, official = cm.compute()["mIoU"], official_ade20k_miou(pairs, k)
    assert math.isclose(ours, brute_force(pairs, k)["mIoU"], rel_tol=1e-12)
    assert math.isclose(official, ours * 5 / 7, rel_tol=1e-9) and official < ours - 0.05
    # every class labelled somewhere (as each of the 150 is in the full ADE20k val split): the two agree
    pairs = random_pairs(k, n=4, seed=3)
    assert all(any((label == c).any() for _, label in pairs) for c in range(k))
    cm = ConfusionMatrix(k)
    for pred, label in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert math.isclose(cm.compute()["mIoU"], official_ade20k_miou(pairs, k), rel_tol=1e-9)


def test_ignore_only_and_errors():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 2]), torch.tensor([255, 255]))
    assert cm.mat.sum() == 0 and math.isnan(cm.compute()["mIoU"])
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([3]), torch.tensor([0]))  # a prediction beyond num_classes
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([7]))  # a label that is neither a class nor ignore
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_reduce_is_noop_single_process_and_format():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    before = cm.mat.clone()
    assert torch.equal(cm.reduce().mat, before)
    table = cm.format(["wall", "building, edifice", "sky"], columns=2).splitlines()
    assert "building" in table[1] and "edifice" not in "".join(table) and table[-1].startswith("mIoU 50.00 | mAcc")
    assert len(table) == 4  # header, 3 present classes two per line, summary
    assert table[2].split() == ["sky", "0.00", "0.00"]  # labelled once, never predicted
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 3]), torch.tensor([0, 0]))  # class 3 only predicted: IoU 0, Acc undefined
    cells = [c.split() for c in cm.format(columns=4).splitlines()[1].split(" | ")]
    assert cells == [["0", "50.00", "50.00"], ["3", "0.00", "nan"]]  # absent classes 1 and 2 get no cell


def _reduce_worker(rank, world, init_file, k, pairs, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix(k)
    for pred, label in pairs[rank::world]:  # each rank its shard; rank 1 may see fewer images
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    cm.reduce()
    if rank == 0:
        torch.save(cm.mat, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [3, 1])  # 1: rank 1 sees no image (a val split smaller than the world)
def test_reduce_sums_over_two_gloo_ranks(tmp_path, n):
    import torch.multiprocessing as mp
    k = 5
    pairs = random_pairs(k, n=n, seed=1)
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), k, pairs, str(tmp_path / "mat.pt")), nprocs=2)
    single = ConfusionMatrix(k)
    for pred, label in pairs:
        single.update(torch.from_numpy(pred), torch.from_numpy(label))
    assert torch.equal(torch.load(tmp_path / "mat.pt"), single.mat)


@pytest.mark.cuda
def test_reduce_moves_an_empty_ranks_matrix_to_the_gpu(tmp_path):
    """Our GPU group is cpu:gloo + cuda:nccl, routed by the tensor's device: a rank that saw no image (CPU zeros)
    must still reduce on the GPU, or it enters gloo while the others wait in NCCL."""
    import torch.distributed as dist
    from common import dist as segdist
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        assert segdist.collective_device() == torch.device("cuda", 0)
        empty = ConfusionMatrix(3).reduce()
        assert empty.mat.device.type == "cuda" and empty.mat.sum().item() == 0
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 1, 1], device="cuda"))
        assert cm.reduce().mat.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_a_count_begun_on_the_cpu_goes_on_on_the_gpu():
    """The matrix follows the data: pixels counted on the CPU stay counted when later ones arrive on the GPU."""
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1, 2], device="cuda"), torch.tensor([1, 255], device="cuda"))
    assert cm.mat.device.type == "cuda" and cm.mat.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_another_ignore_index_is_honoured():
    """The ignore label is the constructor's, not a hard-coded 255."""
    k = 5
    pairs = random_pairs(k, n=3, seed=2)
    pairs = [(p, np.where(l == 255, 7, l)) for p, l in pairs]
    cm = ConfusionMatrix(k, ignore_index=7)
    for pred, label in pairs:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    res, ref = cm.compute(), brute_force(pairs, k, ignore=7)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert math.isclose(res[key], ref[key], rel_tol=1e-12), key
