"""Running VMs on QEMU: ``barge run/stop/ip/ssh/exec``.

One concept per module, imports in one direction (``runner`` at the top, leaves below)::

    runner   start, wait (foreground), stop, status: the library API the CLI wraps
    qemu     the QEMU command line (pure: a LaunchSpec in, argv out) and finding binaries
    boot     boot methods: direct kernel, UEFI (OVMF + per-VM NVRAM), BIOS; host checks
    kvm      the KVM probe: /dev/kvm present *and usable*, else TCG with a reason
    qmp      the QMP client (control socket)
    net      user-mode networking, forwarded ports, bridged taps
    seed     the NoCloud ``cidata`` seed (a small ISO9660 + Joliet writer)
    access   the store's SSH key pair, ssh argv, waiting for a guest's SSH banner
    state    the runtime state file of a running VM and process liveness (a leaf:
             stdlib only, so the store can name a running VM in its lock errors)

See docs/vm.md.
"""
