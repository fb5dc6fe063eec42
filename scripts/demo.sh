#!/usr/bin/env bash
# make demo: the main job end to end on embedded defaults.
#
# A private pcscd with vsmartcard's vpcd driver; DEMO_CARDS blank virtual
# cards fed one after another into its reader; the perso station
# personalizes each under the demo issuer public key and prints (Id, c).
# Nothing decrypts c here: that happens only in the issuer's PKCS#11 token.
#
# Settings (environment): DEMO_CARDS (5), DEMO_PROFILE (rsa-oaep-aes),
# DEMO_OUT (demo-out). Everything the run makes is left in DEMO_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

cards=${DEMO_CARDS:-5}
profile=${DEMO_PROFILE:-rsa-oaep-aes}
out=${DEMO_OUT:-demo-out}
case $profile in
	ecdh-*) demokey=testdata/keys/p256.pem ;;
	*) demokey=testdata/keys/rsa2048.pem ;;
esac

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# pcscd's socket path must stay short (sun_path is 108 bytes).
pcdir=$(mktemp -d /tmp/bp-pcscd.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	cp "$pcdir"/*.log "$out"/ 2>/dev/null || true
	rm -rf "$pcdir"
}
trap cleanup EXIT

echo "== issuer public key (demo key: the issuer's token replaces it)"
openssl pkey -in "$demokey" -pubout -out "$out/issuer.pub.pem" 2>/dev/null
fp=$(bin/issuer fingerprint "$out/issuer.pub.pem")
echo "   $out/issuer.pub.pem  sha256 $fp"

echo "== private pcscd with a vpcd reader"
bin/vcard pcscd --dir "$pcdir" >"$out/pcscd.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^slot 1' "$out/pcscd.out" && break; sleep 0.1; done
grep -q '^slot 1' "$out/pcscd.out" || { cat "$out/pcscd.out"; exit 1; }
export "$(head -1 "$out/pcscd.out")"
addr=$(awk '/^slot 0/ {print $3}' "$out/pcscd.out")
reader=$(sed -n 's/^slot 0: [^ ]* "\(.*\)"$/\1/p' "$out/pcscd.out")
echo "   reader \"$reader\" (vpcd at $addr), $PCSCLITE_CSOCK_NAME"

echo "== manufacture $cards blank virtual cards"
bin/vcard manufacture --dir "$out/cards" --count "$cards" >/dev/null
bin/vcard feed --reader "$addr" "$out"/cards/*.json 2>"$out/vcard.log" &
pids+=($!)

echo "== perso station: profile $profile"
start=$(date +%s.%N)
bin/perso run --issuer-key "$out/issuer.pub.pem" --profile "$profile" \
	--expect-fingerprint "$fp" --reader "$reader" --count "$cards" \
	--batch "$out/batch.ndjson" --station demo --progress off 2>"$out/perso.log"
end=$(date +%s.%N)

echo "== (Id, c) per card: $out/batch.ndjson, manifest $out/batch.ndjson.manifest.json"
sed -E 's/.*"id":"([^"]+)","c":"([^"]+)".*/\1  \2/' "$out/batch.ndjson" |
	awk '{ printf "   %s  %s…%s (%d bytes)\n", $1, substr($2, 1, 24), substr($2, length($2)-7), length($2)/2 }'

echo "== card states"
bin/vcard status "$out"/cards/*.json | sed -E 's/.*"id":"([^"]+)".*"state":"([^"]+)".*/   \1  \2/'
locked=$(bin/vcard status "$out"/cards/*.json | grep -c '"state":"locked"' || true)
printf '== %d of %d cards personalized and locked in %.1f s; artifacts in %s\n' \
	"$locked" "$cards" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$out"
[ "$locked" = "$cards" ]
