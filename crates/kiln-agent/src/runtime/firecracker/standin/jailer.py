#!/usr/bin/python3
# Stand-in for Firecracker's jailer in the driver's tests, following its documentation
# (docs/jailer.md): options before `--`, Firecracker's own after it; the jail root is
# <chroot-base-dir>/<exec file name>/<id>/root; with --new-pid-ns the exec file runs as a child
# whose pid goes to <jail root>/<exec file name>.pid, and the jailer exits. It does not chroot,
# switch uid or create cgroups (it is not the jailer); it records its argv for the test.
import os, subprocess, sys

args = sys.argv[1:]
sep = args.index("--")
opts, fc_args = args[:sep], args[sep + 1:]
values, i = {}, 0
while i < len(opts):
    if opts[i] in ("--daemonize", "--new-pid-ns"):
        values[opts[i]] = True
        i += 1
    else:
        values.setdefault(opts[i], []).append(opts[i + 1])
        i += 2
exec_file = values["--exec-file"][0]
name = os.path.basename(exec_file)
jail_id = values["--id"][0]
root = os.path.join(values["--chroot-base-dir"][0], name, jail_id, "root")
os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "jailer.argv"), "w") as f:
    f.write("\n".join(sys.argv))
assert values.get("--new-pid-ns"), "the driver relies on --new-pid-ns for the pid file"
child = subprocess.Popen(
    [sys.executable, exec_file, "--id=" + jail_id] + fc_args,
    cwd=root,
    stdin=subprocess.DEVNULL,
    start_new_session=True,
)
with open(os.path.join(root, name + ".pid"), "w") as f:
    f.write(str(child.pid))
