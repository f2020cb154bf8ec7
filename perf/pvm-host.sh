# Sourced by perf/qemu-blkbench.sh and perf/qemu-netbench.sh, after PARAMS (the guest's
# command line) and CPU (QEMU -cpu) are set: what QEMU needs on the lab's nested PVM host
# (the kvm_pvm module is loaded), where ringvm makes the same adjustments itself.
if [ -d /sys/module/kvm_pvm ]; then
    # The guest's CPUID comes from the L1 host, which may not publish the TSC rate (leaf
    # 0x40000010, what +invtsc asks QEMU for): pass it on the command line (the L1
    # kernel's "cpu MHz" is its TSC rate).
    if [[ " $PARAMS" != *" tsc_khz="* ]]; then
        khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
        if [ -n "$khz" ]; then PARAMS="$PARAMS tsc_khz=$khz"; fi
    fi
    # This host's KVM refuses writes to IA32_ARCH_CAPABILITIES (MSR 0x10a), which
    # "-cpu host" sets on AMD hosts there; QEMU then aborts at vCPU setup.
    if [[ $CPU != *arch-capabilities* ]]; then CPU="$CPU,-arch-capabilities"; fi
fi
