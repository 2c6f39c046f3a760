# wardgate A/B boot script for U-Boot (the QEMU image's boot loader; any board whose
# U-Boot can write FAT can use it). Compile: mkimage -A arm64 -T script -C none \
#   -n wardgate -d wardgate-boot.cmd boot.scr
#
# The slot comes from wardgate-boot.txt on this FAT boot partition, written by
# wardgate-agent's state-file backend:
#   default=A|B        the committed slot
#   try=A|B, tries=N   a trial: boot `try` while tries > 0, one try used per boot
# A trial boots once; unless the agent commits it (default=try, no trial), the next boot
# is the default again. The state is written back before the kernel starts, so a trial
# that hangs or crashes still used up its try; a boot that changes nothing writes nothing.
# A slot without a kernel falls back to the default at once. The kernel learns its slot
# from `wardgate.slot=` on its command line.
#
# The state is kept twice, wardgate-boot.txt and wardgate-boot.bak, written one after the
# other by the agent and by this script: if the first cannot be read (missing, or cut short
# by a power cut while written), the second is. If neither can, the script boots slot A and
# writes nothing: it never turns an unknown committed slot into A on the card.

setenv wg_state wardgate-boot.txt
setenv wg_backup wardgate-boot.bak
# Slot A is partition 2, B partition 3, of the disk this script came from.
setenv wg_part_A 2
setenv wg_part_B 3
setenv wg_root /dev/vda

setenv wg_known
for wg_file in ${wg_state} ${wg_backup}; do
  if test -z "${wg_known}"; then
    setenv default
    setenv try
    setenv tries
    if load ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} ${wg_file}; then
      env import -t ${ramdisk_addr_r} ${filesize} default try tries
    fi
    if test "${default}" = "A" || test "${default}" = "B"; then
      setenv wg_known ${wg_file}
    else
      echo "wardgate: ${wg_file} unreadable"
    fi
  fi
done
if test -z "${wg_known}"; then
  echo "wardgate: no readable state; booting slot A and leaving the state as it is"
  setenv default A
  setenv wg_slot A
else
  setenv wg_slot ${default}
  # Written only when something changes: a try used, a spent trial cleared, or the first
  # copy repaired from the second. An ordinary boot leaves the card alone.
  setenv wg_write
  if test "${wg_known}" = "${wg_backup}"; then
    setenv wg_write 1
  fi
  if test -n "${try}" && test -n "${tries}" && test ${tries} -gt 0; then
    setenv wg_slot ${try}
    setexpr tries ${tries} - 1
    setenv wg_write 1
    env export -t ${ramdisk_addr_r} default try tries
  else
    if test -n "${try}"; then
      setenv wg_write 1
    fi
    setenv try
    setenv tries
    env export -t ${ramdisk_addr_r} default
  fi
  if test -z "${wg_write}"; then
    echo "wardgate: state unchanged"
  elif fatwrite ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} ${wg_state} ${filesize} && fatwrite ${devtype} ${devnum}:${distro_bootpart} ${ramdisk_addr_r} ${wg_backup} ${filesize}; then
    echo "wardgate: state written"
  else
    echo "wardgate: cannot write the state; a trial would repeat, so booting the default"
    setenv wg_slot ${default}
  fi
fi

for wg_try_slot in ${wg_slot} ${default}; do
  if test "${wg_try_slot}" = "B"; then setenv wg_part ${wg_part_B}; else setenv wg_part ${wg_part_A}; fi
  echo "wardgate: booting slot ${wg_try_slot} (partition ${wg_part})"
  setenv bootargs "console=ttyAMA0 root=${wg_root}${wg_part} rootwait ro wardgate.slot=${wg_try_slot}"
  if load ${devtype} ${devnum}:${wg_part} ${kernel_addr_r} /boot/Image; then
    if load ${devtype} ${devnum}:${wg_part} ${ramdisk_addr_r} /boot/initrd.img; then
      booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
    else
      booti ${kernel_addr_r} - ${fdtcontroladdr}
    fi
  fi
  echo "wardgate: slot ${wg_try_slot} did not boot"
done
echo "wardgate: no slot booted"
