#!/usr/bin/env bash
# Checks the Debian package built by `cargo deb`: every file it must install is inside, and installing it
# creates the wsgw system user and a working binary. Run as root on a Debian machine; it purges the package
# again afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(ls -t target/debian/wsgw_*.deb | head -n 1)
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
expected=(
    ./usr/bin/wsgw
    ./lib/systemd/system/wsgw.service
    ./etc/wsgw/wsgw.toml
    ./usr/share/bash-completion/completions/wsgw
    ./usr/share/zsh/vendor-completions/_wsgw
    ./usr/share/fish/vendor_completions.d/wsgw.fish
    ./usr/share/wsgw/completions/wsgw.elv
    ./usr/share/wsgw/completions/_wsgw.ps1
    ./usr/share/doc/wsgw/README.md
)
for page in man/*.1; do
    expected+=("./usr/share/man/man1/$(basename "$page").gz")
done
missing=0
for file in "${expected[@]}"; do
    if ! grep -qxF "$file" <<<"$contents"; then
        echo "check-deb: $deb lacks $file" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1
dpkg-deb -f "$deb" Depends | grep -q adduser || { echo "check-deb: the package must depend on adduser" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ] || ! command -v dpkg >/dev/null; then
    echo "check-deb: contents OK; skipping the install check (needs root and dpkg)"
    exit 0
fi
if dpkg -s wsgw >/dev/null 2>&1; then
    echo "check-deb: a wsgw package is already installed; skipping the install check" >&2
    exit 0
fi
trap 'dpkg --purge wsgw >/dev/null 2>&1 || true' EXIT
# A user left by an earlier purge (Debian keeps system users) would hide a postinst that creates none.
if getent passwd wsgw >/dev/null; then
    userdel wsgw
fi
dpkg -i "$deb" >/dev/null
getent passwd wsgw >/dev/null || { echo "check-deb: installing did not create the wsgw user" >&2; exit 1; }
[ "$(stat -c %G /etc/wsgw/wsgw.toml)" = wsgw ] || { echo "check-deb: /etc/wsgw/wsgw.toml is not group wsgw" >&2; exit 1; }
/usr/bin/wsgw --version >/dev/null
/usr/bin/wsgw --config /etc/wsgw/wsgw.toml serve --check >/dev/null
man -w wsgw-serve >/dev/null 2>&1 || [ -f /usr/share/man/man1/wsgw-serve.1.gz ]
echo "check-deb: $deb installs every file and the wsgw user"
