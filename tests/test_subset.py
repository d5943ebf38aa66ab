"""`celebgen.py subset`: the benchmark set of RESULTS.md, rebuilt from a full CelebA by its list."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import celebgen as cg
from conftest import ROOT
from test_training import cli, labelled_celeba


def test_the_shipped_list_is_the_benchmark_set():
    """assets/celeba_subset.txt names 6,000 distinct CelebA images with CelebA's official split of
    them: 4,560 train, 780 val, 660 test (200 identities x 30 images)."""
    rows = [line.split() for line in (ROOT / "assets" / "celeba_subset.txt").read_text().splitlines()]
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)) == 6000 and names == sorted(names)
    assert all(len(n) == 10 and n[:6].isdigit() and n.endswith(".jpg") for n in names)
    assert [sum(split == k for _, split in rows) for k in "012"] == [4560, 780, 660]


def test_subset_holds_exactly_the_listed_images_with_their_split_and_labels(workdir, capsys):
    """From a CelebA of 24 images (20 train, 4 val; 15 labelled) and a list of 7 of them, `subset`
    writes a folder in the official layout with exactly those 7 files, byte for byte; its splits
    and labels are CelebA's for them, so a dataset read from it equals CelebA's images and labels."""
    labelled_celeba(workdir / "celeba")
    listed = ["001.png", "004.png", "013.png", "016.png", "019.png", "021.png", "023.png"]
    (workdir / "list.txt").write_text("\ufeff" + "".join(f"{n} 9\n" for n in listed) + "\n",  # split ignored
                                      encoding="utf-8")  # as some editors save: a byte-order mark first
    code, out, err = cli(capsys, "subset", "--data_root", "celeba", "--image_list", "list.txt",
                         "--out", "sub")
    assert code == 0 and "7 images (train 5, val 2, test 0) and their attributes" in out, err
    copied = sorted(p.name for p in (workdir / "sub" / "img_align_celeba").iterdir())
    assert copied == listed and sorted(p.name for p in (workdir / "sub").iterdir()) == [
        "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"]
    assert all((workdir / "sub/img_align_celeba" / n).read_bytes() ==
               (workdir / "celeba/img_align_celeba" / n).read_bytes() for n in listed)
    full = {s: cg.CelebA(workdir / "celeba", s, 8, attributes=["Smiling", "Young"])
            for s in ("train", "val")}
    for split in ("train", "val"):
        part = cg.CelebA(workdir / "sub", split, 8, attributes=["Smiling", "Young"])
        assert [p.name for p in part.files] == [n for n in listed
                                                if n in {p.name for p in full[split].files}]
        for i, path in enumerate(part.files):
            j = full[split].files.index(workdir / "celeba/img_align_celeba" / path.name)
            assert (part[i] == full[split][j]).all()
            assert part.label(i).tolist() == full[split].label(j).tolist()  # 0 where unlabelled
    assert part.unlabelled == 2  # 021 and 023 have no row in CelebA's attribute file either


@pytest.mark.parametrize("case,message", [
    ("exists", "sub exists; remove it, or choose another --out"),
    ("not_listed", "1 of the 2 images of list.txt are not in"),
    ("csv", "3 of the 3 images of list.txt are not in celeba/img_align_celeba with a row of "
            "list_eval_partition.txt (e.g. ['image_id,partition']); is --data_root all of CelebA, and "
            "does each line start with a bare file name, like 000001.jpg?"),
    ("no_list", "cannot read --image_list missing.txt"),
    ("plain_folder", "has no split file: subset copies from CelebA itself, in one of these layouts: "
                     "ROOT/celeba/img_align_celeba"),
    ("no_data", "--data_root gone is not a folder; give the folder CelebA is unpacked in"),
    ("here", "--out '.' names no new folder; give one to create"),
    ("nothing", "--out '' names no new folder; give one to create"),
    ("inside_the_data", "is inside --data_root celeba, where it would stand for CelebA itself"),
    ("twice", "names 001.png (and 0 more) twice; give each image once"),
    ("empty", "names no image; give a file name, such as 000001.jpg, at each line's start"),
    ("under_a_file", "list.txt is a file, where celebgen keeps a folder; move it away"),
    ("full_disk", "cannot write sub (No space left on device); free some space, then run the same "
                  "command again"),
])
def test_a_subset_that_cannot_be_made_is_one_line_and_writes_nothing(workdir, capsys, monkeypatch,
                                                                      case, message):
    labelled_celeba(workdir / "celeba")
    (workdir / "list.txt").write_text({"not_listed": "001.png\n999.png\n", "empty": "\n",
                                       "csv": "image_id,partition\n001.png,0\n002.png,0\n",
                                       "twice": "001.png\n002.png\n001.png\n"}.get(case,
                                                                                "001.png\n002.png\n"))
    root, image_list = "celeba", "missing.txt" if case == "no_list" else "list.txt"
    out = {"inside_the_data": "celeba/celeba", "here": ".", "nothing": "",
           "under_a_file": "list.txt/sub"}.get(case, "sub")
    if case == "full_disk":  # the second image's copy finds the disk full
        copies, copy = [], cg.shutil.copyfile

        def copy_until_full(*paths):
            copies.append(paths)
            if len(copies) > 1:
                raise OSError(cg.errno.ENOSPC, "No space left on device")
            return copy(*paths)
        monkeypatch.setattr(cg.shutil, "copyfile", copy_until_full)
    if case == "exists":
        (workdir / "sub").mkdir()
    if case == "plain_folder":
        root = "celeba/img_align_celeba"
    if case == "no_data":
        root = "gone"
    code, _, err = cli(capsys, "subset", "--data_root", root, "--image_list", image_list,
                       "--out", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in Path(workdir).iterdir()) == (
        ["celeba", "list.txt", "sub"] if case == "exists" else ["celeba", "list.txt"])
    assert not (workdir / "celeba/celeba").exists()


def test_subset_leaves_other_folders_alone_and_clears_what_a_killed_one_left(workdir, capsys):
    """Its work in progress is out.PID.partial: a folder of the user's named out.partial is left
    alone, as is a running subset's; a killed one's (its process gone) is deleted, as is the
    out.PID.old a killed `sample` leaves while it replaces its folder."""
    labelled_celeba(workdir / "celeba")
    (workdir / "list.txt").write_text("001.png\n002.png\n")
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    for name in ("sub.partial", f"sub.{os.getppid()}.partial", f"sub.{dead.pid}.partial", f"sub.{dead.pid}.old"):
        (workdir / name).mkdir()
        (workdir / name / "notes.txt").write_text("mine")
    code, out, err = cli(capsys, "subset", "--data_root", "celeba", "--image_list", "list.txt",
                         "--out", "sub")
    assert code == 0, err
    assert sorted(p.name for p in workdir.iterdir()) == [
        "celeba", "list.txt", "sub", f"sub.{os.getppid()}.partial", "sub.partial"]
    assert (workdir / "sub.partial" / "notes.txt").read_text() == "mine"


def test_a_subset_that_another_one_finished_first_says_so(workdir, capsys, monkeypatch):
    """Two subsets of one --out at once: the one whose folder cannot take the place of the other's
    says that another run made it, and leaves it whole."""
    labelled_celeba(workdir / "celeba")
    (workdir / "list.txt").write_text("001.png\n")
    rename = Path.rename

    def the_other_first(self, target):  # another subset's folder appears just before this rename
        if self.name.endswith(".partial"):
            (workdir / "sub").mkdir()
            (workdir / "sub" / "theirs").write_text("complete")
            raise OSError(cg.errno.ENOTEMPTY, "Directory not empty")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", the_other_first)
    code, _, err = cli(capsys, "subset", "--data_root", "celeba", "--image_list", "list.txt",
                       "--out", "sub")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write sub (Directory not empty); another subset made it meanwhile" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["celeba", "list.txt", "sub"]
    assert (workdir / "sub" / "theirs").read_text() == "complete"


def test_an_out_folder_written_with_a_slash_is_the_same_folder(workdir, capsys):
    labelled_celeba(workdir / "celeba")
    (workdir / "list.txt").write_text("001.png\n002.png\n")
    code, out, err = cli(capsys, "subset", "--data_root", "celeba", "--image_list", "list.txt",
                         "--out", "sub/")
    assert code == 0, err
    assert sorted(p.name for p in (workdir / "sub/img_align_celeba").iterdir()) == [
        "001.png", "002.png"] and sorted(p.name for p in workdir.iterdir()) == [
        "celeba", "list.txt", "sub"]
