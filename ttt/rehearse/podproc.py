"""Inside a rehearsal pod's namespaces: mount its volumes, lock its root, drop to its user, exec."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# Kernel file systems and the device tree stay as the runtime gives them (as a container's).
# Absolute paths: the pod runs them as root before it drops to its user.
MOUNT = shutil.which("mount") or "/usr/bin/mount"
KEEP_WRITABLE = ("/proc", "/sys", "/dev")


def _mount(*args: str) -> None:
    subprocess.run([MOUNT, *args], check=True, capture_output=True)


def _mountpoint(path: str, created: list[str]) -> None:
    """Create `path` (and its parents) if missing; record what was created for the cleanup."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(str(p))
        p = p.parent
    os.makedirs(path, exist_ok=True)
    created += reversed(missing)


def mount_volume(m: dict[str, Any], fs_group: int | None, created: list[str]) -> None:
    """One volumeMount: an emptyDir is a tmpfs of its sizeLimit (writes past it fail, where the
    kubelet would evict), a Secret/ConfigMap a tmpfs holding its keys, a claim a bind mount."""
    path = m["path"]
    _mountpoint(path, created)
    if m["kind"] == "bind":  # from the source opened before any mount could hide it
        fd = m["fd"]
        subprocess.run([MOUNT, "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", path], check=True,
                       capture_output=True, pass_fds=(fd,))  # fmt: skip
    else:
        size = f",size={m['size']}" if m.get("size") else ""
        _mount("-t", "tmpfs", "-o", f"mode={m.get('mode', 0o1777):o}{size}", "tmpfs", path)
        for name, f in m.get("files", {}).items():
            target = Path(path) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(f["data"]))
            os.chmod(target, f["mode"])
            if fs_group is not None:  # the kubelet gives volume files the pod's fsGroup
                os.chown(target, 0, fs_group)
        if m.get("owner") is not None:
            os.chown(path, m["owner"], m["owner"])
    if fs_group is not None and m["kind"] != "files":
        os.chown(path, os.stat(path).st_uid, fs_group)
        os.chmod(path, os.stat(path).st_mode | 0o2070)
    if m.get("readOnly") or m["kind"] == "files":
        _mount("-o", "remount,bind,ro", path)


def reachable(paths: list[str], staging: str) -> None:
    """The image's user must reach the interpreter and the code (in an image, /opt/venv).
    Where a folder on the way is closed to others (root's home holding pyenv), this pod sees
    a traversable empty folder there with just the needed child bound back in."""
    done = set()
    for path in paths:
        parts = Path(path).parts
        for depth in range(1, len(parts) - 1):
            folder, child = Path(*parts[: depth + 1]), parts[depth + 1]
            if os.stat(folder).st_mode & 0o001:
                continue
            if (folder, child) not in done:
                stage = Path(staging) / f"{len(done)}"
                stage.mkdir(parents=True, exist_ok=True)
                _mount("--bind", str(folder / child), str(stage))
                _mount("-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(folder))
                (folder / child).mkdir()
                _mount("--move", str(stage), str(folder / child))
                done.add((folder, child))
            break


def lock_root(volumes: list[str]) -> None:
    """readOnlyRootFilesystem: every mount but the kernel's and the pod's volumes turns
    read-only in this mount namespace (the host's stay as they are)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point in volumes or any(point == k or point.startswith(k + "/") for k in KEEP_WRITABLE):
            continue
        if any(point.startswith(v.rstrip("/") + "/") for v in volumes):
            continue
        points.append(point)
    for point in points:
        subprocess.run([MOUNT, "-o", "remount,bind,ro", point], check=False, capture_output=True)


def main(path: str) -> None:
    pod = json.loads(Path(path).read_text())
    socket.sethostname(pod["hostname"])  # its own UTS namespace: the pod's name
    created: list[str] = []
    fs_group = pod.get("fsGroup")
    record = open(pod["created"], "w")  # noqa: SIM115 - before the mounts may hide its folder
    reachable(pod["reachable"], pod["staging"])
    for m in pod["mounts"]:
        if m["kind"] == "bind":
            m["fd"] = os.open(m["source"], os.O_PATH | os.O_DIRECTORY)
    # The interpreter and the code stay visible where a pod's volume (its own /tmp) covers them.
    code = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in pod["reachable"]}
    for m in pod["mounts"]:
        mount_volume(m, fs_group, created)
    covered = [p for p in sorted(code) if any(p.startswith(m["path"].rstrip("/") + "/")
                                              for m in pod["mounts"])]  # fmt: skip
    for where in covered:  # the outermost of them (the code holds the venv)
        if not any(where.startswith(done + "/") for done in covered if done != where):
            mount_volume({"path": where, "kind": "bind", "fd": code[where]}, None, [])
    record.write("\n".join(created))
    record.close()
    if pod.get("readOnlyRoot"):
        lock_root([m["path"] for m in pod["mounts"]])
    gid, uid = pod.get("gid"), pod.get("uid")
    if gid is not None:
        os.setgroups([g for g in (gid, fs_group) if g is not None])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    env = pod["env"]
    try:
        os.chdir(pod["cwd"])
    except OSError as exc:
        sys.exit(f"pod {pod['name']}: working directory {pod['cwd']}: {exc}")
    try:
        # the container's own command, as a runtime starts it (no shell)
        os.execvpe(pod["argv"][0], pod["argv"], env)  # nosec B606
    except OSError as exc:  # as a runtime's "executable file not found in $PATH"
        sys.exit(f"pod {pod['name']}: exec {pod['argv'][0]}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1])
