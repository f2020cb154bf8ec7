#!/usr/bin/env bash
# Build the ringvm Linux guest from Debian packages: Debian's cloud kernel (as a vmlinux
# ELF for the PVH entry, and the bzImage), and an uncompressed cpio initramfs with
# busybox, the virtio modules, fio and its shared libraries, and an /init that runs a
# dd self-test or an fio job on /dev/vda and then ends the VM.
#
#   guests/linux/build.sh            # outputs in guests/linux/out/
#
# Environment: OUT (output folder), KERNEL_PKG (a linux-image-* package instead of the one
# linux-image-cloud-amd64 depends on), FIO=0 (leave fio out of initramfs.cpio).
# Needs root on Debian bookworm (apt-get; runs apt-get update when a package is unknown
# and installs fio and lz4 on the host when missing: fio's libraries are taken from the
# host through ldd). Idempotent: downloaded packages are kept in OUT/debs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-$HERE/out}
DEBS=$OUT/debs
WANT_FIO=${FIO:-1}
# The modules /init loads; their dependencies are added from each module's .modinfo.
MODULES="virtio_blk virtio_net virtio_pci"

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, and mknod for /dev/console in the initramfs)"
command -v apt-get >/dev/null || die "needs a Debian system with apt-get"
mkdir -p "$DEBS"
printf '*\n' > "$OUT/.gitignore"

apt_known() { apt-cache show "$1" >/dev/null 2>&1; }
apt_updated=0
ensure_known() {
    if ! apt_known "$1" && [ $apt_updated = 0 ]; then
        say "apt-get update ($1 unknown)"
        apt-get update -qq
        apt_updated=1
    fi
    apt_known "$1" || die "package $1 not found by apt"
}
host_install() { # host_install COMMAND PACKAGE
    command -v "$1" >/dev/null && return
    ensure_known "$2"
    say "installing $2 on this host (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
# fetch PACKAGE: the newest .deb of PACKAGE in $DEBS (downloaded when missing); prints its path
fetch() {
    local pkg=$1 deb
    deb=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$deb" ]; then
        ensure_known "$pkg"
        say "apt-get download $pkg"
        (cd "$DEBS" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        deb=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
    fi
    printf '%s\n' "$deb"
}

# ---- kernel ---------------------------------------------------------------------------
if [ -z "${KERNEL_PKG:-}" ]; then
    ensure_known linux-image-cloud-amd64
    KERNEL_PKG=$(apt-cache depends linux-image-cloud-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    [ -n "$KERNEL_PKG" ] || die "linux-image-cloud-amd64 names no versioned linux-image-* dependency"
fi
KDEB=$(fetch "$KERNEL_PKG")
KROOT=$OUT/kernel
if [ ! -e "$KROOT/.from" ] || [ "$(cat "$KROOT/.from")" != "$(basename "$KDEB")" ]; then
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$KDEB" "$KROOT"
    basename "$KDEB" > "$KROOT/.from"
fi
KVER=$(ls "$KROOT/lib/modules" | head -n 1)
[ -n "$KVER" ] || die "$KDEB has no lib/modules/<version>"
cp -p "$KROOT/boot/vmlinuz-$KVER" "$OUT/bzImage"
cp -p "$KROOT/boot/config-$KVER" "$OUT/config"

# vmlinux: the bzImage's payload starts at (setup_sects + 1) * 512 + payload_offset
# (boot protocol header: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c).
le32() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
u8() { od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
extract_vmlinux() {
    local bz=$1 dst=$2 sects off len start magic
    sects=$(u8 "$bz" $((0x1f1))); [ "$sects" = 0 ] && sects=4
    off=$(le32 "$bz" $((0x248))); len=$(le32 "$bz" $((0x24c)))
    start=$(( (sects + 1) * 512 + off ))
    magic=$(od -An -t x1 -j "$start" -N 6 "$bz" | tr -d ' ')
    local cat
    case $magic in
        02214c18*) host_install lz4 lz4; cat="lz4 -dc" ;;
        1f8b*) cat="gzip -dc" ;;
        fd377a585a00) host_install xz xz-utils; cat="xz -dc" ;;
        28b52ffd*) host_install zstd zstd; cat="zstd -dc" ;;
        *) die "unknown bzImage payload compression (magic $magic)" ;;
    esac
    # The payload ends with the uncompressed size (4 bytes); lz4 and gzip complain about
    # that trailer after writing everything, so only the result is checked.
    tail -c +$((start + 1)) "$bz" | head -c "$len" | $cat > "$dst.tmp" 2>/dev/null || true
    [ "$(od -An -t x1 -N 4 "$dst.tmp" | tr -d ' ')" = 7f454c46 ] ||
        die "decompressing the bzImage payload ($cat) gave no ELF"
    mv "$dst.tmp" "$dst"
}
if [ ! -s "$OUT/vmlinux" ] || [ "$OUT/bzImage" -nt "$OUT/vmlinux" ]; then
    say "extracting vmlinux from $(basename "$KDEB")"
    extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux"
fi
pvh="unknown (no readelf)"
if command -v readelf >/dev/null; then
    # XEN_ELFNOTE_PHYS32_ENTRY (type 18) is the PVH entry ringvm boots
    if readelf -n "$OUT/vmlinux" 2>/dev/null | grep -Eq 'Xen.*(\(0x00000012\)|PHYS32_ENTRY)'; then
        pvh=yes
    else
        pvh=no
    fi
fi

# ---- initramfs ------------------------------------------------------------------------
BBDEB=$(fetch busybox-static)
BBROOT=$OUT/busybox
rm -rf "$BBROOT"; mkdir -p "$BBROOT"
dpkg-deb -x "$BBDEB" "$BBROOT"
BB=$BBROOT/bin/busybox
[ -x "$BB" ] || die "$BBDEB has no bin/busybox"

ROOT=$OUT/root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,etc/ringvm,lib/modules/"$KVER"}
chmod 1777 "$ROOT/tmp"
cp "$BB" "$ROOT/bin/busybox"
# Only the applets /init and a person at the console need: every cpio entry costs
# kernel time to unpack in emulated ring 0.
for a in sh ash cat echo printf mount umount mkdir mknod ln ls rm cp mv insmod modprobe \
    lsmod rmmod modinfo depmod dd cmp seq head tail sync blockdev reboot halt poweroff sleep \
    dmesg grep sed tr cut uname sha256sum hexdump od xxd ps free df stat test [ wc awk env \
    setsid cttyhack true false uptime date find time taskset; do
    ln -s busybox "$ROOT/bin/$a"
done
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

# modules, dependencies first (from each module's .modinfo "depends=")
declare -A KO_PATH=() LOADED=()
while IFS= read -r f; do
    n=$(basename "$f" .ko); KO_PATH[${n//-/_}]=${f#"$KROOT/lib/modules/$KVER/"}
done < <(find "$KROOT/lib/modules/$KVER" -name '*.ko')
ORDER=()
add_module() {
    local m=${1//-/_} d deps
    [ -n "${LOADED[$m]:-}" ] && return
    if grep -Eq "(^|/)$m\.ko\$" "$KROOT/lib/modules/$KVER/modules.builtin" 2>/dev/null; then
        LOADED[$m]=builtin; return
    fi
    [ -n "${KO_PATH[$m]:-}" ] || die "module $m not found in $KERNEL_PKG"
    deps=$(tr '\0' '\n' < "$KROOT/lib/modules/$KVER/${KO_PATH[$m]}" | sed -n 's/^depends=//p' | head -n 1)
    for d in ${deps//,/ }; do add_module "$d"; done
    LOADED[$m]=module
    ORDER+=("${KO_PATH[$m]}")
}
for m in $MODULES; do add_module "$m"; done
for p in "${ORDER[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$p")"
    cp "$KROOT/lib/modules/$KVER/$p" "$ROOT/lib/modules/$KVER/$p"
done
printf '%s\n' "${ORDER[@]}" > "$ROOT/etc/ringvm/modules"
cp "$KROOT/lib/modules/$KVER/modules.builtin" "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
"$BB" depmod -b "$ROOT" "$KVER" # so that modprobe works at the console
echo "$KVER" > "$ROOT/etc/ringvm/kernel"
install -m 755 "$HERE/init" "$ROOT/init"

mkcpio() { # mkcpio DIR FILE
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) > "$2.tmp"
    mv "$2.tmp" "$2"
}
# initramfs-base.cpio: no fio, a quarter of the kernel's unpacking time on this lab's host
mkcpio "$ROOT" "$OUT/initramfs-base.cpio"

fio_ver="left out (FIO=0)"
if [ "$WANT_FIO" != 0 ]; then
    host_install fio fio
    FIO_BIN=$(command -v fio)
    fio_ver=$("$FIO_BIN" --version)
    mkdir -p "$ROOT/usr/bin"
    cp "$FIO_BIN" "$ROOT/usr/bin/fio"
    # every library ldd resolves, at the same path (RUNPATHs such as .../ceph keep working)
    ldd "$FIO_BIN" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' |
    while IFS= read -r lib; do
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done
    ldd "$FIO_BIN" | grep -q 'not found' && die "ldd $FIO_BIN: a library is missing: $(ldd "$FIO_BIN" | grep 'not found')"
    [ -e "$ROOT/lib64" ] || ln -s lib "$ROOT/lib64"
fi
mkcpio "$ROOT" "$OUT/initramfs.cpio"

# ---- report ---------------------------------------------------------------------------
size() { du -h "$1" | cut -f1; }
cat <<EOF
ringvm Linux guest built in $OUT:
  kernel        $KERNEL_PKG ($KVER)
  vmlinux       $(size "$OUT/vmlinux")  ELF, PVH entry note: $pvh
  bzImage       $(size "$OUT/bzImage")
  initramfs.cpio       $(size "$OUT/initramfs.cpio")  uncompressed newc: busybox $("$BB" | head -n 1 | awk '{print $2}'), $(( ${#ORDER[@]} )) modules, fio: $fio_ver
  initramfs-base.cpio  $(size "$OUT/initramfs-base.cpio")  the same without fio
  modules (load order): $(printf '%s ' "${ORDER[@]##*/}")
  config        $OUT/config
Run (dd self-test; ends with an i8042 reset, ringvm exits 0):
  ringvm run --kernel $OUT/vmlinux --initrd $OUT/initramfs.cpio --disk path=disk.img \\
      --memory 512M --cmdline "console=ttyS0 reboot=k ringvm.test=dd"
EOF
