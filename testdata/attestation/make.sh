#!/bin/sh
# make.sh regenerates the chip-attestation vectors of docs/PROTOCOL.md
# §10.5 in this directory: a test chip-vendor CA, for every vector of
# ../vectors.json a card key, card certificate, A and signature, and the
# mutations an issuer must refuse. It uses only the openssl command line
# and shell tools (printf, xxd, sha256sum), so the vectors are made
# without the code they test; python3 only reads ../vectors.json and
# writes vectors.json. Every run draws new keys: the files change, the
# properties the tests check do not. testdata/README.md describes the
# output.
#
#   sh testdata/attestation/make.sh
set -eu
cd "$(dirname "$0")"
umask 022

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf cards mutations root.pem root.key.pem intermediate.pem intermediate.key.pem vectors.json
mkdir cards mutations

VENDOR="blindperso test chip vendor"
LABEL="blindperso attest v1"
BASE="rsa-oaep-aes/rsa2048"      # the vector every mutation starts from
OTHER="rsa-oaep-sha1/rsa2048"    # its c is another valid c under the same issuer key

# Extension sections, one per kind of certificate (§10.1 for the card),
# and a minimal CA for `openssl ca`, the one tool here that takes
# explicit validity dates (for the expired certificate).
cnf="$tmp/openssl.cnf"
mkdir "$tmp/ca"
: >"$tmp/ca/index.txt"
openssl rand -hex 16 | sed 's/^./4/' >"$tmp/ca/serial"
cat >"$cnf" <<EOF
[ req ]
distinguished_name = req_dn
[ req_dn ]
[ root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ intermediate ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ card ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
authorityKeyIdentifier = keyid:always
[ ca ]
default_ca = past_ca
[ past_ca ]
database = $tmp/ca/index.txt
new_certs_dir = $tmp/ca
serial = $tmp/ca/serial
default_md = sha256
policy = any_dn
unique_subject = no
copy_extensions = none
[ any_dn ]
serialNumber = supplied
commonName = optional
EOF

# newkey FILE: a fresh P-256 key, PKCS#8 PEM.
newkey() {
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-pkeyopt ec_param_enc:named_curve -out "$1"
	chmod 600 "$1"
}
# serial: a random positive 128-bit certificate serial number, in hex.
serial() { openssl rand -hex 16 | sed 's/^./4/'; }
# issue SUBJECT KEY OUT CACERT CAKEY SECTION DAYS: certify KEY's public key.
issue() {
	openssl req -new -config "$cnf" -key "$2" -subj "$1" -out "$tmp/req.csr"
	openssl x509 -req -in "$tmp/req.csr" -CA "$4" -CAkey "$5" -set_serial "0x$(serial)" \
		-days "$7" -sha256 -extfile "$cnf" -extensions "$6" -out "$3"
}
# ca ROOT.PEM ROOT.KEY INT.PEM INT.KEY: a root and an intermediate of VENDOR.
ca() {
	newkey "$2"
	openssl req -x509 -new -config "$cnf" -extensions root -key "$2" -sha256 \
		-subj "/O=$VENDOR/CN=$VENDOR root" -set_serial "0x$(serial)" -days 14610 -out "$1"
	newkey "$4"
	issue "/O=$VENDOR/CN=$VENDOR intermediate" "$4" "$3" "$1" "$2" intermediate 10957
}
# cardsubj ID: the subject of §10.1 for the lower-case hex Id.
cardsubj() { printf '/serialNumber=%s/CN=blindperso card %s' "$1" "$1"; }
# hexof STRING, der FILE.pem, sha256hex HEX: encodings, all lower-case hex.
hexof() { printf '%s' "$1" | xxd -p | tr -d '\n'; }
der() { openssl x509 -in "$1" -outform DER | xxd -p | tr -d '\n'; }
sha256hex() { printf '%s' "$1" | xxd -r -p | sha256sum | cut -d' ' -f1; }
# message ID PROFILE FINGERPRINT CSHA256: A of §10.2, byte by byte.
message() {
	printf '%s%02x%s%02x%s%s%s' "$(hexof "$LABEL")" $((${#1} / 2)) "$1" \
		${#2} "$(hexof "$2")" "$3" "$4"
}
# sign KEY AHEX: the DER ECDSA-P256-SHA256 signature over A, in hex.
sign() {
	printf '%s' "$2" | xxd -r -p >"$tmp/A.bin"
	openssl dgst -sha256 -sign "$1" -out "$tmp/sig.der" "$tmp/A.bin"
	xxd -p "$tmp/sig.der" | tr -d '\n'
}
# verify CERT AHEX SIGHEX: openssl checks its own signature before it is kept.
verify() {
	printf '%s' "$2" | xxd -r -p >"$tmp/A.bin"
	printf '%s' "$3" | xxd -r -p >"$tmp/sig.der"
	openssl x509 -in "$1" -pubkey -noout >"$tmp/pub.pem"
	openssl dgst -sha256 -verify "$tmp/pub.pem" -signature "$tmp/sig.der" "$tmp/A.bin" >/dev/null
}

ca root.pem root.key.pem intermediate.pem intermediate.key.pem
openssl verify -CAfile root.pem intermediate.pem >/dev/null
INTER=$(der intermediate.pem)

# One line per vector for python3 to turn into JSON: tab-separated
# key=value fields, every value hex or a plain name.
out="$tmp/records"
: >"$out"
record() { (IFS='	'; printf '%s\n' "$*") >>"$out"; }

python3 -c '
import json, sys
for v in json.load(open(sys.argv[1])):
    print(v["name"], v["profile"], v["issuer_fingerprint"], v["c"], v["card_id"])
' ../vectors.json >"$tmp/inputs"

while read -r name profile fp c id; do
	key="cards/$id.key.pem" cert="cards/$id.pem"
	newkey "$key"
	issue "$(cardsubj "$id")" "$key" "$cert" intermediate.pem intermediate.key.pem card 7305
	openssl verify -CAfile root.pem -untrusted intermediate.pem "$cert" >/dev/null
	csha=$(sha256hex "$c")
	A=$(message "$id" "$profile" "$fp" "$csha")
	sig=$(sign "$key" "$A")
	verify "$cert" "$A" "$sig"
	record kind=vector name="$name" profile="$profile" card_id="$id" issuer_fingerprint="$fp" c="$c" \
		c_sha256="$csha" attest_message="$A" card_key_file="$key" card_cert_file="$cert" \
		chain="$(der "$cert"),$INTER" fingerprint="$fp" sig="$sig"
	if [ "$name" = "$BASE" ]; then
		b_profile=$profile b_fp=$fp b_c=$c b_id=$id b_key=$key b_cert=$cert
		b_csha=$csha b_A=$A b_sig=$sig
	fi
	if [ "$name" = "$OTHER" ]; then o_c=$c; fi
done <"$tmp/inputs"

# mutation NAME CHECK WHAT CARD_CERT_FILE CHAIN FINGERPRINT CSHA256 SIG [C]:
# the base record with its attestation (and c) replaced.
mutation() {
	record kind=mutation name="$1" check="$2" what="$3" base="$BASE" profile="$b_profile" \
		card_id="$b_id" issuer_fingerprint="$b_fp" c="${9:-$b_c}" card_cert_file="$4" \
		chain="$5" fingerprint="$6" c_sha256="$7" sig="$8"
}
genuine="$(der "$b_cert"),$INTER"

# 1. A chain under a root the issuer does not trust: a second CA with the
#    same names, certifying the genuine card key for the genuine Id.
ca "$tmp/u-root.pem" "$tmp/u-root.key" mutations/untrusted-intermediate.pem "$tmp/u-int.key"
cp "$tmp/u-root.pem" mutations/untrusted-root.pem
issue "$(cardsubj "$b_id")" "$b_key" mutations/untrusted-card.pem \
	mutations/untrusted-intermediate.pem "$tmp/u-int.key" card 7305
mutation untrusted-root 1 \
	"the chain ends at a second root (mutations/untrusted-root.pem, same names as root.pem, another key), not a trusted one" \
	mutations/untrusted-card.pem "$(der mutations/untrusted-card.pem),$(der mutations/untrusted-intermediate.pem)" \
	"$b_fp" "$b_csha" "$b_sig"

# 1. An expired card certificate: valid from 2000-01-01 to 2001-01-01 only.
openssl req -new -config "$cnf" -key "$b_key" -subj "$(cardsubj "$b_id")" -out "$tmp/req.csr"
openssl ca -batch -config "$cnf" -extfile "$cnf" -extensions card -preserveDN -notext \
	-cert intermediate.pem -keyfile intermediate.key.pem \
	-startdate 000101000000Z -enddate 010101000000Z -in "$tmp/req.csr" -out mutations/expired-card.pem
mutation expired-certificate 1 \
	"the card certificate (mutations/expired-card.pem) expired on 2001-01-01" \
	mutations/expired-card.pem "$(der mutations/expired-card.pem),$INTER" "$b_fp" "$b_csha" "$b_sig"

# 1. A truncated chain: the card certificate without its intermediate.
mutation truncated-chain 1 \
	"the chain holds the card certificate only; the intermediate is missing, so it does not reach the root" \
	"$b_cert" "$(der "$b_cert")" "$b_fp" "$b_csha" "$b_sig"

# 2. A certificate for another Id: the genuine key, certified under the
#    base Id with its last byte flipped.
last=$(printf '%s' "$b_id" | cut -c$((${#b_id} - 1))-)
other_id=$(printf '%s%02x' "$(printf '%s' "$b_id" | cut -c1-$((${#b_id} - 2)))" $((0x$last ^ 1)))
issue "$(cardsubj "$other_id")" "$b_key" mutations/other-id-card.pem intermediate.pem intermediate.key.pem card 7305
mutation certificate-for-other-id 2 \
	"the card certificate (mutations/other-id-card.pem) certifies the card key for Id $other_id, not the record's Id $b_id" \
	mutations/other-id-card.pem "$(der mutations/other-id-card.pem),$INTER" "$b_fp" "$b_csha" "$b_sig"

# 3. A signature by another key than the certified one, over the right A.
newkey "$tmp/other.key"
mutation signature-by-other-key 3 \
	"sig is a valid signature over A, by a P-256 key that no certificate in the chain certifies" \
	"$b_cert" "$genuine" "$b_fp" "$b_csha" "$(sign "$tmp/other.key" "$b_A")"

# 3. A signature over another c: the attestation claims SHA-256 of the
#    record's c, but the card key signed A with SHA-256 of another c.
o_csha=$(sha256hex "$o_c")
mutation signature-over-other-c 3 \
	"sig is the card key's signature over A with SHA-256 of another c ($OTHER's), not over A with the c_sha256 given" \
	"$b_cert" "$genuine" "$b_fp" "$b_csha" "$(sign "$b_key" "$(message "$b_id" "$b_profile" "$b_fp" "$o_csha")")"

# 4. The card was personalized under another issuer key (Fig. 2): the
#    card signed the attacker key's fingerprint.
a_fp=$(openssl pkey -in ../keys/rsa2048-attacker.pem -pubout -outform DER | sha256sum | cut -d' ' -f1)
mutation substituted-issuer-key 4 \
	"the card signed fingerprint(PK') of keys/rsa2048-attacker.pem, not the record's issuer key: PK substitution" \
	"$b_cert" "$genuine" "$a_fp" "$b_csha" "$(sign "$b_key" "$(message "$b_id" "$b_profile" "$a_fp" "$b_csha")")"

# 5. The record's c replaced: a genuine attestation of the base c beside
#    another valid c under the same issuer key ($OTHER's).
mutation record-c-replaced 5 \
	"the record's c is $OTHER's c; the genuine attestation signed SHA-256 of another c" \
	"$b_cert" "$genuine" "$b_fp" "$b_csha" "$b_sig" "$o_c"

root_sha256=$(openssl x509 -in root.pem -outform DER | sha256sum | cut -d' ' -f1)
python3 -c '
import json, sys
root_sha256, records = sys.argv[1], sys.argv[2]
vectors, mutations = [], []
for line in open(records):
    f = dict(kv.split("=", 1) for kv in line.rstrip("\n").split("\t"))
    kind = f.pop("kind")
    att = {"chain": f.pop("chain").split(","), "fingerprint": f.pop("fingerprint"),
           "c_sha256": f.pop("c_sha256"), "sig": f.pop("sig")}
    if kind == "mutation":
        f["check"] = int(f["check"])
    f["attestation"] = att
    (vectors if kind == "vector" else mutations).append(f)
json.dump({"format": "blindperso-attestation-vectors/1", "root": "root.pem",
           "intermediate": "intermediate.pem", "root_sha256": root_sha256,
           "vectors": vectors, "mutations": mutations}, open("vectors.json", "w"), indent=2)
open("vectors.json", "a").write("\n")
' "$root_sha256" "$out"
echo "testdata/attestation: $(wc -l <"$out") records; root.pem SHA-256 $root_sha256"
