"""The two shell scripts that start the lab's dom0, kept as text beside the code that packs them.

* ``INITRAMFS_INIT`` is PID 1 of dom0's tiny initramfs (busybox-static): the
  guest kernel, used as dom0's kernel, has virtio_blk and ext4 as modules, so
  something must load them before dom0's root disk can be mounted.
* ``DOM0_INIT`` is dom0's real init (no systemd): the start-up sequence of
  xen-notes.md in its order, then the job from the second disk, then power-off.
  It must never exit (PID 1): after ``sysrq o`` the disks are gone and
  exec'ing anything fails, so it waits with the shell builtin ``read -t``.

Both are part of the cache key of the dom0 image, so editing them rebuilds it.
"""
from __future__ import annotations

ROOT_LABEL = "sc-xenlab-dom0"
JOB_LABEL = "sc-xenlab-job"
READY_LINE = "xenlab: dom0 ready"
JOB_EXIT_PREFIX = "xenlab: job exit "

INITRAMFS_INIT = r"""#!/bin/busybox sh
# dom0's initramfs: load the block and file-system modules, mount the root disk, switch to it.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.order); do $B insmod "/$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B sleep 0.1; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw /dev/vda /newroot; then
  echo "xenlab: cannot mount dom0's root /dev/vda"
  $B mkfifo /wait
  echo o > /proc/sysrq-trigger
  exec 3<>/wait
  while :; do read -t 60 x <&3; done
fi
$B umount /proc /sys
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /sbin/xenlab-init
"""

DOM0_INIT = r"""#!/bin/bash
# PID 1 of the lab's dom0: Xen's daemons in the order xen-notes.md found working, then the job.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
set +e
say() { echo "xenlab: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# udev would make these; the block hotplug script's lock loop spins forever without /dev/stdin.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mkdir -p /run/lock /run/xen /var/log/xen/console /var/lib/xen
hostname xenlab-dom0
modprobe -a xen-evtchn xenfs xen-privcmd xen-gntdev xen-gntalloc xen-blkback loop dm-snapshot
# No udev here: LVM makes its device nodes itself instead of waiting for udev's.
export DM_DISABLE_UDEV=1
mount -t xenfs xenfs /proc/xen
/usr/lib/xen-4.17/bin/oxenstored --pid-file /run/xen/xenstored.pid
for i in $(seq 150); do xenstore-read -s / >/dev/null 2>&1 && break; sleep 0.2; done
/usr/lib/xen-4.17/bin/xen-init-dom0 >/dev/null
/usr/lib/xen-4.17/bin/xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest \
  --log-dir=/var/log/xen/console
say "dom0 ready (uptime $(cut -d' ' -f1 /proc/uptime) s)"

mkdir -p /job
rc=99
if mount -t ext4 /dev/vdb /job; then
  limit=$(cat /job/timeout 2>/dev/null || echo 600)
  cache=$(cat /job/cache-root 2>/dev/null || echo /root/.cache/supercharge)
  mkdir -p "$(dirname "$cache")" /job/out
  ln -sfn /job/cache "$cache"
  cd /job
  timeout -k 5 "$limit" bash /job/job.sh 2>&1 | tee /job/out/job.log
  rc=${PIPESTATUS[0]}
  echo "$rc" > /job/out/returncode
  cd /
  xl list > /job/out/xl-list.txt 2>&1
  cp -r /var/log/xen /job/out/xen-logs 2>/dev/null
  sync
  umount /job || { sync; say "could not unmount the job disk"; }
else
  say "no job disk (/dev/vdb)"
fi
say "job exit $rc"
sync
mkfifo /run/xenlab.wait
exec 3<>/run/xenlab.wait
echo o > /proc/sysrq-trigger
# Nothing can be exec'ed any more: wait with builtins only.
while :; do read -t 60 x <&3; done
"""
