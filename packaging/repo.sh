#!/usr/bin/env bash
# Turns the packages in target/packages/ (every architecture there) into a static, signed
# package repository under target/repo/ that any static web host or bucket can serve:
#
#   target/repo/
#     secoda-agent-archive-keyring.gpg   public key, binary (apt's Signed-By:)
#     secoda-agent-archive-keyring.asc   public key, armoured (rpm's gpgkey=)
#     apt/pool/main/s/secoda-agent/*.deb          every version published so far
#     apt/dists/stable/{Release,InRelease,Release.gpg}
#     apt/dists/stable/main/binary-{amd64,arm64}/Packages{,.gz}
#     rpm/packages/*.rpm                          signed (rpmsign), every version so far
#     rpm/repodata/                               createrepo_c; repomd.xml.asc signed
#     rpm/secoda-agent.repo                       for /etc/yum.repos.d/
#
# Publishing is additive: packages already in the tree stay (so hosts can pin or downgrade);
# run it after each packaging/build.sh, then sync target/repo/ to the web host.
#
# The signing key (an OpenPGP secret key, RSA so that rpm on RHEL 7/8 and Amazon Linux 2 can
# check it) comes from SECODA_SIGNING_KEY (the armoured key itself, e.g. a CI secret) or
# SECODA_SIGNING_KEY_FILE (a path); never from the repository. It is imported into a
# throwaway GNUPGHOME that is deleted on exit. REPO_URL (the address target/repo/ will be
# served at) goes into the .repo file.
#
# Uses Debian's apt-ftparchive (apt-utils), gpg, rpmsign (rpm) and createrepo_c
# (createrepo-c); installs them when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

REPO_URL=${REPO_URL:-https://REPO_URL}
out=${SECODA_REPO_DIR:-target/repo}
packages=${SECODA_PACKAGES_DIR:-target/packages}

missing=()
command -v apt-ftparchive >/dev/null || missing+=(apt-utils)
command -v gpg >/dev/null || missing+=(gnupg)
command -v rpmsign >/dev/null || missing+=(rpm)
command -v createrepo_c >/dev/null || missing+=(createrepo-c)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

GNUPGHOME=$(mktemp -d)
export GNUPGHOME
trap 'gpgconf --kill all >/dev/null 2>&1 || true; rm -rf "$GNUPGHOME"' EXIT
if [ -n "${SECODA_SIGNING_KEY:-}" ]; then
    printf '%s\n' "$SECODA_SIGNING_KEY" | gpg --batch --quiet --import
elif [ -n "${SECODA_SIGNING_KEY_FILE:-}" ]; then
    gpg --batch --quiet --import "$SECODA_SIGNING_KEY_FILE"
else
    echo "$0: set SECODA_SIGNING_KEY (the armoured secret key) or SECODA_SIGNING_KEY_FILE" >&2
    exit 64
fi
fpr=$(gpg --batch --with-colons --list-secret-keys | awk -F: '$1 == "fpr" { print $10; exit }')
[ -n "$fpr" ] || { echo "$0: the signing key holds no secret key" >&2; exit 64; }
sign=(gpg --batch --yes --pinentry-mode loopback --passphrase "${SECODA_SIGNING_PASSPHRASE:-}" --local-user "$fpr")

mkdir -p "$out"
gpg --batch --export "$fpr" > "$out/secoda-agent-archive-keyring.gpg"
gpg --batch --armor --export "$fpr" > "$out/secoda-agent-archive-keyring.asc"

# apt: a pool, and one Packages index per architecture present.
pool=$out/apt/pool/main/s/secoda-agent
mkdir -p "$pool"
shopt -s nullglob
debs=("$packages"/*.deb)
rpms=("$packages"/*.rpm)
[ ${#debs[@]} -gt 0 ] || [ ${#rpms[@]} -gt 0 ] || { echo "$0: no packages in $packages (run packaging/build.sh)" >&2; exit 1; }
for deb in "${debs[@]}"; do
    cp -f "$deb" "$pool/"
done
arches=()
for deb in "$pool"/*.deb; do
    arches+=("$(dpkg-deb -f "$deb" Architecture)")
done
mapfile -t arches < <(printf '%s\n' "${arches[@]}" | sort -u)
dist=$out/apt/dists/stable
rm -rf "$dist"
for arch in "${arches[@]}"; do
    dir=$dist/main/binary-$arch
    mkdir -p "$dir"
    (cd "$out/apt" && apt-ftparchive --arch "$arch" packages pool/main) > "$dir/Packages"
    gzip -9n -k "$dir/Packages"
done
(cd "$out/apt" && apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=Secoda \
    -o APT::FTPArchive::Release::Label=secoda-agent \
    -o APT::FTPArchive::Release::Suite=stable \
    -o APT::FTPArchive::Release::Codename=stable \
    -o "APT::FTPArchive::Release::Architectures=${arches[*]}" \
    -o APT::FTPArchive::Release::Components=main \
    -o APT::FTPArchive::Release::Description="secoda-agent packages" \
    release dists/stable) > "$out/Release.tmp"
mv "$out/Release.tmp" "$dist/Release"
"${sign[@]}" --clearsign --digest-algo SHA512 -o "$dist/InRelease" "$dist/Release"
"${sign[@]}" --detach-sign --armor --digest-algo SHA512 -o "$dist/Release.gpg" "$dist/Release"

# rpm: packages signed with the same key, then metadata, then the metadata signed.
rpmdir=$out/rpm
mkdir -p "$rpmdir/packages"
for rpm in "${rpms[@]}"; do
    cp -f "$rpm" "$rpmdir/packages/"
    rpmsign --addsign \
        --define "_gpg_name $fpr" \
        --define "_gpg_path $GNUPGHOME" \
        --define "__gpg $(command -v gpg)" \
        --define "_gpg_digest_algo sha256" \
        --define "_gpg_sign_cmd_extra_args --batch --pinentry-mode loopback --passphrase '${SECODA_SIGNING_PASSPHRASE:-}'" \
        "$rpmdir/packages/$(basename "$rpm")" >/dev/null
done
createrepo_c --quiet --update "$rpmdir" >/dev/null
"${sign[@]}" --detach-sign --armor -o "$rpmdir/repodata/repomd.xml.asc" "$rpmdir/repodata/repomd.xml"
cat > "$rpmdir/secoda-agent.repo" <<EOF
[secoda-agent]
name=secoda-agent
baseurl=$REPO_URL/rpm
enabled=1
gpgcheck=1
repo_gpgcheck=1
gpgkey=$REPO_URL/secoda-agent-archive-keyring.asc
EOF

echo "repository in $out, signed by $fpr:"
find "$out" -type f | sort
