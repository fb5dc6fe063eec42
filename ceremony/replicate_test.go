package ceremony

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/pinholder"
	"blindperso/protocol"
)

// groupScript is a ceremony on token uri (SO PIN in soFile) with the
// given body (issuer keys, kek, replicate, token.members as extra lines
// of token).
func groupScript(uri, soFile, members, out, suffix, body string) string {
	return fmt.Sprintf(`ceremony: group-ceremony
token:
  uri: %q
  so-pin: {file: %s}
%sroles:
  operator: Alice Operator
  security-officer: Sam Officer
  witnesses: [Wendy Witness]
output: %s
transcript-key: {label: transcript%s}
%s`, uri, soFile, members, out, suffix, body)
}

func membersYAML(ms ...[2]string) string {
	if len(ms) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("  members:\n")
	for _, m := range ms {
		fmt.Fprintf(&b, "    - uri: %q\n", m[0])
		if m[1] != "" {
			fmt.Fprintf(&b, "      so-pin: {file: %s}\n", m[1])
		}
	}
	return b.String()
}

func soFile(t *testing.T, dir string, tok hsmtest.Token) string {
	t.Helper()
	p := filepath.Join(dir, tok.Label+".so.pin")
	if err := os.WriteFile(p, []byte(tok.SOPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const groupKeys = `issuer-keys:
  - {label: issuer-rsa-g, kind: rsa2048, profiles: [rsa-oaep-aes]}
  - {label: issuer-ec-g, kind: p256, profiles: [ecdh-p256-aes]}
kek: {label: kek-g}
`

// TestReplicationCeremony: a ceremony makes the issuer keys and the KEK
// on member 1 and replicates them to member 2; the signed transcript
// records both tokens, the replication-import key's fingerprint, every
// replicated object's attributes and the equality proofs; both members
// hold the same keys (audit clean on both, one throwaway card imported
// on each gives byte-identical blobs); the PIN-holder adversary on a
// replicated pair opens no path a token without replication does not.
// A later ceremony copies the same keys to a third member (replicate:).
func TestReplicationCeremony(t *testing.T) {
	ctx := context.Background()
	// Every token before any is opened.
	m1, m2, m3 := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	dir := t.TempDir()
	so1, so2, so3 := soFile(t, dir, m1), soFile(t, dir, m2), soFile(t, dir, m3)
	out := filepath.Join(dir, "out")
	n1, n2 := count(t, m1.URI), count(t, m2.URI)
	script := groupScript(m1.URI, so1, membersYAML([2]string{m2.URI, so2}), out, "-g", groupKeys)
	// The dry run says what it would copy, and makes nothing.
	ps, err := Parse([]byte(script))
	if err != nil {
		t.Fatal(err)
	}
	var plan strings.Builder
	if _, err := Run(ctx, ps, Options{DryRun: true, Log: &plan}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(plan.String(), "replicate issuer-rsa-g, issuer-ec-g, kek-g to member 0 \""+m2.Label) || !strings.Contains(plan.String(), "replicable") {
		t.Errorf("dry run:\n%s", plan.String())
	}
	if count(t, m1.URI) != n1 || count(t, m2.URI) != n2 {
		t.Error("the dry run made objects")
	}
	res, err := run(t, script, false)
	if err != nil {
		t.Fatal(err)
	}
	// Member 1: transcript key, two key pairs, KEK; member 2: the
	// replicas, nothing else (no transport object left).
	if n := count(t, m1.URI); n != n1+7 {
		t.Errorf("member 1: %d objects, want %d", n, n1+7)
	}
	if n := count(t, m2.URI); n != n2+5 {
		t.Errorf("member 2: %d objects, want %d", n, n2+5)
	}
	v, err := Verify(filepath.Join(out, TranscriptFile), "", res.Body.TranscriptKey.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	b := v.Body
	if len(b.Members) != 1 || b.Members[0].Label != m2.Label || b.Members[0].Serial == "" || b.Members[0].SOPINSource != "file:"+so2 {
		t.Errorf("members in the transcript: %+v", b.Members)
	}
	for _, st := range b.Steps {
		if (st.Step == "generate-issuer-key" || st.Step == "generate-kek") && st.Inputs["replicable"] != true {
			t.Errorf("%s %v: not replicable", st.Step, st.Inputs["label"])
		}
	}
	st := stepOf(t, b, "replicate")
	rk := st.Result["replication_import_key"].(map[string]any)
	if fp, _ := rk["fingerprint"].(string); len(fp) != 64 {
		t.Errorf("replication-import key fingerprint %v", rk)
	}
	tgt := st.Inputs["target"].(map[string]any)
	src := st.Inputs["source"].(map[string]any)
	if tgt["label"] != m2.Label || src["label"] != m1.Label || tgt["serial"] == "" || src["serial"] == "" {
		t.Errorf("source %v, target %v", src, tgt)
	}
	objs := st.Result["objects"].([]any)
	if len(objs) != 5 {
		t.Errorf("%d replicated objects recorded, want 5", len(objs))
	}
	for _, o := range objs {
		o := o.(map[string]any)
		attrs := o["attributes"].(map[string]any)
		if attrs["CKA_LABEL"] != o["label"] || attrs["CKA_MODIFIABLE"] != "false" {
			t.Errorf("object %v: attributes %v", o["label"], attrs)
		}
	}
	proofs := st.Result["proofs"].([]any)
	if len(proofs) != 6 {
		t.Errorf("%d proofs, want 6", len(proofs))
	}
	for _, p := range proofs {
		if p.(map[string]any)["equal"] != true {
			t.Errorf("proof %v", p)
		}
	}
	t.Logf("replicate step: %v", st.Result)

	// Both members hold the same keys.
	t1, err := hsm.OpenURI(m1.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer t1.Close()
	t2, err := hsm.OpenURI(m2.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer t2.Close()
	sameKeys(t, t1, t2, "-g")

	// The adversary on a replicated pair: every path on both members.
	for _, tc := range []struct {
		tok, peer *hsm.Token
		ht, pt    hsmtest.Token
		isSource  bool
	}{{t1, t2, m1, m2, false}, {t2, t1, m2, m1, true}} {
		rep, err := pinholder.Run(ctx, tc.tok, pinholder.Options{UserPIN: tc.ht.PIN, SOPIN: tc.ht.SOPIN, Peer: tc.peer, PeerSOPIN: tc.pt.SOPIN, PeerIsSource: tc.isSource})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("adversary on %s: %s", tc.ht.Label, rep.Summary())
		if got, want := rep.OpenIDs(), tc.tok.Mechanisms().OpenPaths; !slices.Equal(got, want) {
			t.Errorf("%s: open paths %v, a token without replication has %v", tc.ht.Label, got, want)
		}
		if rep.Skipped != 0 {
			t.Errorf("%s: %d paths not tried", tc.ht.Label, rep.Skipped)
		}
	}

	// A later ceremony adds member 3: the same keys, copied.
	out2 := filepath.Join(dir, "out2")
	n3 := count(t, m3.URI)
	t2.Close()
	t1.Close()
	res2, err := run(t, groupScript(m1.URI, so1, membersYAML([2]string{m3.URI, so3}), out2, "-g2",
		"replicate: {issuer-keys: [issuer-rsa-g, issuer-ec-g], kek: kek-g}\n"), false)
	if err != nil {
		t.Fatal(err)
	}
	// The keys of replicate: have no profiles in the script; each is
	// still proved by a throwaway card of its kind's profile, in the
	// signed transcript.
	v2, err := Verify(filepath.Join(out2, TranscriptFile), "", res2.Body.TranscriptKey.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	proofs2 := stepOf(t, v2.Body, "replicate").Result["proofs"].([]any)
	for _, tc := range []struct{ label, profile string }{{"issuer-rsa-g", "rsa-oaep-aes"}, {"issuer-ec-g", "ecdh-p256-aes"}} {
		n := 0
		for _, p := range proofs2 {
			p := p.(map[string]any)
			if p["what"] == "issuer key "+tc.label+" and KEK kek-g" && strings.Contains(fmt.Sprint(p["method"]), "throwaway card") &&
				strings.Contains(fmt.Sprint(p["method"]), "profile "+tc.profile) && p["equal"] == true {
				n++
			}
		}
		if n != 1 {
			t.Errorf("member 3: %d card proofs of %s (profile %s), want 1", n, tc.label, tc.profile)
		}
	}
	if n := count(t, m3.URI); n != n3+5 {
		t.Errorf("member 3: %d objects, want %d", n, n3+5)
	}
	t1, _ = hsm.OpenURI(m1.URI, 1)
	defer t1.Close()
	t3, err := hsm.OpenURI(m3.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer t3.Close()
	sameKeys(t, t1, t3, "-g")
}

// sameKeys: both tokens hold the issuer keys and KEK of groupKeys under
// the same labels, pass the audit, and give one throwaway card the same
// blob.
func sameKeys(t *testing.T, a, b *hsm.Token, sfx string) {
	t.Helper()
	ctx := context.Background()
	type set struct {
		rsa, ec *hsm.IssuerKeyRef
		kek     *hsm.KEKRef
	}
	get := func(tok *hsm.Token) set {
		var s set
		var err error
		if s.rsa, err = tok.FindIssuerKey(ctx, "issuer-rsa"+sfx); err != nil {
			t.Fatal(err)
		}
		if s.ec, err = tok.FindIssuerKey(ctx, "issuer-ec"+sfx); err != nil {
			t.Fatal(err)
		}
		if s.kek, err = tok.FindKEK(ctx, "kek"+sfx); err != nil {
			t.Fatal(err)
		}
		if fs, err := tok.Audit(ctx, []*hsm.IssuerKeyRef{s.rsa, s.ec}, s.kek, nil); err != nil || len(fs) != 0 {
			t.Errorf("%s: audit: %v %v", tok.Info().Label, fs, err)
		}
		if !s.rsa.Replicable || !s.ec.Replicable || !s.kek.Replicable || !s.kek.Trusted {
			t.Errorf("%s: keys not replicable/trusted", tok.Info().Label)
		}
		return s
	}
	x, y := get(a), get(b)
	if x.rsa.Fingerprint() != y.rsa.Fingerprint() || x.ec.Fingerprint() != y.ec.Fingerprint() {
		t.Error("the members' issuer keys have different fingerprints")
	}
	for _, tc := range []struct {
		p    protocol.Profile
		k, l *hsm.IssuerKeyRef
	}{{protocol.RSAOAEPAES, x.rsa, y.rsa}, {protocol.ECDHP256AES, x.ec, y.ec}} {
		_, c, err := protocol.Encapsulate(tc.p, tc.k.Public, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		ca := &hsm.CardKeys{Token: a, Key: tc.k, KEK: x.kek}
		cb := &hsm.CardKeys{Token: b, Key: tc.l, KEK: y.kek}
		ba, err := ca.Import(ctx, tc.p, c)
		if err != nil {
			t.Fatal(err)
		}
		bb, err := cb.Import(ctx, tc.p, c)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba.Wrapped, bb.Wrapped) || ba.KEK != bb.KEK {
			t.Errorf("%s: one card, two blobs: %x on %s, %x on %s", tc.p.Name, ba.Wrapped, a.Info().Label, bb.Wrapped, b.Info().Label)
		}
		ca.Close(ctx)
		cb.Close(ctx)
	}
}

// TestGroupExample: examples/ceremony-group-softhsm2.yaml parses, with
// one member, and makes every key replicable.
func TestGroupExample(t *testing.T) {
	t.Setenv("BLINDPERSO_TOKEN", "pkcs11:token=a?module-path=/x.so")
	t.Setenv("BLINDPERSO_TOKEN_2", "pkcs11:token=b?module-path=/x.so")
	t.Setenv("BLINDPERSO_SO_PIN_FILE", "/nonexistent-a")
	t.Setenv("BLINDPERSO_SO_PIN_FILE_2", "/nonexistent-b")
	t.Setenv("CEREMONY_OUT", t.TempDir())
	ex, err := Load("../examples/ceremony-group-softhsm2.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(ex.Token.Members) != 1 || ex.Token.Members[0].URI != "pkcs11:token=b?module-path=/x.so" || ex.Token.Members[0].SOPIN.File != "/nonexistent-b" ||
		!ex.replicableKEK() || !ex.replicableKey(ex.IssuerKeys[0]) || !ex.replicableKey(ex.IssuerKeys[1]) {
		t.Fatalf("example: %+v", ex.Token)
	}
}

// TestReplicationCeremonyRefusals: every refusal of a replication comes before
// anything is created, in any token or the output directory.
func TestReplicationCeremonyRefusals(t *testing.T) {
	ctx := context.Background()
	m1, m2, m3, nss := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.NSS(t)
	dir := t.TempDir()
	so1, so2 := soFile(t, dir, m1), soFile(t, dir, m2)
	// A label already in member 3, and a key that is not replicable in
	// member 1.
	t3, err := hsm.OpenURI(m3.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := t3.GenerateIssuerKey(ctx, hsm.KindP256, "issuer-ec-r"); err != nil {
		t.Fatal(err)
	}
	t3.Close()
	t1, err := hsm.OpenURI(m1.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := t1.GenerateIssuerKey(ctx, hsm.KindP256, "plain-r"); err != nil {
		t.Fatal(err)
	}
	t1.Close()
	keys := strings.ReplaceAll(groupKeys, "-g", "-r")
	for _, tc := range []struct {
		name, uri, members, body, want string
	}{
		{"NSS member", m1.URI, membersYAML([2]string{nss.URI, so2}), keys, "does not enforce CKA_WRAP_WITH_TRUSTED"},
		{"NSS source", nss.URI, "", "issuer-keys:\n  - {label: issuer-x-r, kind: p256, profiles: [ecdh-p256-aes], replicable: true}\n", "does not enforce CKA_WRAP_WITH_TRUSTED"},
		{"member's SO PIN file missing", m1.URI, membersYAML([2]string{m2.URI, filepath.Join(dir, "absent.pin")}), keys, "SO PIN"},
		{"label on the member", m1.URI, membersYAML([2]string{m3.URI, so2}), keys, `label "issuer-ec-r" already exists in member`},
		{"member is the source", m1.URI, membersYAML([2]string{fmt.Sprintf("pkcs11:token=%s?pin-source=file:%s&module-path=%s", m1.Label, m1.PINFile, m1.Module), so2}), keys, "same token"},
		{"not replicable", m1.URI, membersYAML([2]string{m2.URI, so2}), "replicate: {issuer-keys: [plain-r]}\n", "not replicable"},
		{"replicate without members", m1.URI, "", "replicate: {kek: kek-r}\n", "name the members"},
		{"replicable false with members", m1.URI, membersYAML([2]string{m2.URI, so2}), "kek: {label: kek-r, replicable: false}\n", "kek.replicable is false"},
		{"member without so-pin", m1.URI, membersYAML([2]string{m2.URI, ""}), keys, "so-pin: give exactly one"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			src := so1
			if tc.uri == nss.URI {
				src = so2 // not read: refused first
			}
			refusedUnchanged(t, groupScript(tc.uri, src, tc.members, out, "-r", tc.body), tc.want, m1.URI, m2.URI, m3.URI, nss.URI)
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("output directory %s made", out)
			}
		})
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// TestGroupKEKRotation: a kek-rotation ceremony with token.members makes
// the new KEK replicable and copies it to every member, so a card key
// re-wrapped to it on one member (issuer kek rotate) is verified by the
// other; a member without the old KEK is refused before anything is
// made, as is a script that would copy two KEKs.
func TestGroupKEKRotation(t *testing.T) {
	ctx := context.Background()
	m1, m2, m3 := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	dir := t.TempDir()
	so1, so2, so3 := soFile(t, dir, m1), soFile(t, dir, m2), soFile(t, dir, m3)
	if _, err := run(t, groupScript(m1.URI, so1, membersYAML([2]string{m2.URI, so2}), filepath.Join(dir, "made"), "-k", groupKeys), false); err != nil {
		t.Fatal(err)
	}
	rotation := "kek-rotation: {from: kek-g, to: kek-g2}\n"
	for _, tc := range []struct{ name, members, body, want string }{
		{"member without the old KEK", membersYAML([2]string{m3.URI, so3}), rotation, `does not hold kek-rotation.from`},
		{"two KEKs to copy", membersYAML([2]string{m2.URI, so2}), rotation + "kek: {label: kek-other}\n", "kek and kek-rotation: a replication copies one KEK"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			refusedUnchanged(t, groupScript(m1.URI, so1, tc.members, filepath.Join(dir, "refused"), "-x", tc.body), tc.want, m1.URI, m2.URI, m3.URI)
		})
	}

	// The card key stored before the rotation, under kek-g.
	t1, key, old := openKeys(t, m1.URI, "issuer-ec-g", "kek-g")
	p := protocol.ECDHP256AES
	sec, c, err := protocol.Encapsulate(p, key.Public, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ck := &hsm.CardKeys{Token: t1, Key: key, KEK: old}
	blob, err := ck.Import(ctx, p, c)
	if err != nil {
		t.Fatal(err)
	}
	ck.Close(ctx)
	t1.Close()

	res, err := run(t, groupScript(m1.URI, so1, membersYAML([2]string{m2.URI, so2}), filepath.Join(dir, "rotation"), "-k2", rotation), false)
	if err != nil {
		t.Fatal(err)
	}
	st := stepOf(t, res.Body, "generate-rotation-kek")
	if st.Inputs["replicable"] != true {
		t.Errorf("generate-rotation-kek: %v", st.Inputs)
	}
	if objs := stepOf(t, res.Body, "replicate").Inputs["objects"]; fmt.Sprint(objs) != "[kek-g2]" {
		t.Errorf("replicated %v, want [kek-g2]", objs)
	}

	// issuer kek rotate's re-wrap on member 1, verified on member 2.
	t1, _, from := openKeys(t, m1.URI, "issuer-ec-g", "kek-g")
	defer t1.Close()
	to, err := t1.FindKEK(ctx, "kek-g2")
	if err != nil {
		t.Fatal(err)
	}
	rw := &hsm.Rewrapper{Token: t1, From: from, To: to}
	moved, err := rw.Rewrap(ctx, blob)
	rw.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t2, key2, kek2 := openKeys(t, m2.URI, "issuer-ec-g", "kek-g2")
	defer t2.Close()
	if !kek2.Replicable || !kek2.Trusted {
		t.Errorf("member 2's kek-g2: replicable %v, trusted %v", kek2.Replicable, kek2.Trusted)
	}
	ki, err := protocol.DeriveKey(p, sec, protocol.Binding(p, key.Public.SPKI))
	if err != nil {
		t.Fatal(err)
	}
	id, challenge := []byte{0x42, 0x01}, bytes.Repeat([]byte{7}, 16)
	mac, err := protocol.AuthMAC(ki, id, challenge)
	if err != nil {
		t.Fatal(err)
	}
	v := &hsm.CardKeys{Token: t2, Key: key2, KEK: kek2}
	defer v.Close(ctx)
	for _, tc := range []struct {
		mac  []byte
		want bool
	}{{mac, true}, {append([]byte{mac[0] ^ 1}, mac[1:]...), false}} {
		if ok, err := v.Verify(ctx, moved, id, challenge, tc.mac); err != nil || ok != tc.want {
			t.Errorf("member 2 verifies the re-wrapped card key: %v %v, want %v", ok, err, tc.want)
		}
	}
}

// refusedUnchanged: the ceremony script is refused with an error holding
// want, and no token of uris has an object more or less.
func refusedUnchanged(t *testing.T, yaml, want string, uris ...string) {
	t.Helper()
	var counts []int
	for _, u := range uris {
		counts = append(counts, count(t, u))
	}
	s, err := Parse([]byte(yaml))
	if err == nil {
		_, err = Run(context.Background(), s, Options{Log: testLog{t}})
	}
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("%v, want %q", err, want)
	}
	t.Logf("refused: %v", err)
	for i, u := range uris {
		if n := count(t, u); n != counts[i] {
			t.Errorf("token %d: %d objects before, %d after", i, counts[i], n)
		}
	}
}

// openKeys opens the token at uri (one session) and finds an issuer key
// and a KEK in it; the caller closes the token.
func openKeys(t *testing.T, uri, key, kek string) (*hsm.Token, *hsm.IssuerKeyRef, *hsm.KEKRef) {
	t.Helper()
	tok, err := hsm.OpenURI(uri, 1)
	if err != nil {
		t.Fatal(err)
	}
	k, err := tok.FindIssuerKey(context.Background(), key)
	if err != nil {
		tok.Close()
		t.Fatal(err)
	}
	w, err := tok.FindKEK(context.Background(), kek)
	if err != nil {
		tok.Close()
		t.Fatal(err)
	}
	return tok, k, w
}
