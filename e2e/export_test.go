package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/card/cardtest"
	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
	"blindperso/receiver"
)

// TestExportToReceiver is the export of issue 15 end to end, on two
// SoftHSM2 tokens and the real binaries: the issuer's token (keys, KEK,
// and a key-import key by key ceremony), the receiver's token (cmd/receiver
// makes its KTK and wraps it to the key-import key), the KTK received by a
// second ceremony (trusted by the SO), 1000 personalized cards imported
// with issuer import and exported with issuer export; the receiver imports
// the export and every card authenticates there (its MAC over a fresh
// challenge verified in the receiver's token). A copy of the export with
// one line's wrapped key changed is refused on that line, with its
// reason, while the 999 others land. No file the run wrote — the export,
// its manifest, the wrapped KTK, the store, the ceremonies' outputs and
// transcripts, the logs — holds any card's K_I.
func TestExportToReceiver(t *testing.T) {
	const n = 1000
	out := t.TempDir()
	file := func(parts ...string) string { return filepath.Join(append([]string{out}, parts...)...) }
	bin := func(name string) string {
		t.Helper()
		path := file("bin", name)
		build := exec.Command(goTool(), "build", "-o", path, "./cmd/"+name)
		build.Dir = repoRoot(t)
		if b, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", name, err, b)
		}
		return path
	}
	issuerBin, receiverBin := bin("issuer"), bin("receiver")
	// Both tokens under out/token, which the K_I scan skips (the
	// receiver's token holds the imported keys, encrypted under its PIN).
	envI, envR := soakToken(t, file("token", "issuer")), soakToken(t, file("token", "receiver"))
	uri := func(which string) string {
		return fmt.Sprintf("pkcs11:token=soak?module-path=%s&pin-source=file:%s", soakModule, file("token", which, "user.pin"))
	}
	logs := file("logs")
	os.MkdirAll(logs, 0o700)
	run := func(env []string, log string, wantOK bool, name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = env
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		os.WriteFile(filepath.Join(logs, log), append(stdout.Bytes(), stderr.Bytes()...), 0o600)
		if (err == nil) != wantOK {
			t.Fatalf("%s %s: %v (want ok %v)\n%s%s", filepath.Base(name), strings.Join(args, " "), err, wantOK, stdout.String(), stderr.String())
		}
		return stdout.String() + stderr.String()
	}
	issuer := func(log string, args ...string) string { return run(envI, log, true, issuerBin, args...) }

	issuer("keygen.log", "keygen", "--token", uri("issuer"), "--kind", "p256", "--label", "issuer", "--out", file("issuer.pub.pem"))
	issuer("kek.log", "kek", "--token", uri("issuer"), "--label", "kek", "--so-pin-file", file("token", "issuer", "so.pin"))

	// Ceremony 1: the key-import key.
	script := func(name, body string) string {
		path := file(name + ".yaml")
		head := fmt.Sprintf("ceremony: %s\ntoken:\n  uri: %q\n  so-pin:\n    file: %s\nroles:\n  operator: Op\n  security-officer: SO\n  witnesses: [W1, W2]\noutput: %s\ntranscript-key:\n  label: %s-transcript\n",
			name, uri("issuer"), file("token", "issuer", "so.pin"), file("ceremony", name), name)
		if err := os.WriteFile(path, []byte(head+body), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	issuer("ceremony-key-import.log", "ceremony", "run", script("key-import", "key-import:\n  label: key-import\n"))
	pub := file("ceremony", "key-import", "key-import-key-import.pub.pem")

	// The receiver makes its KTK and sends it.
	ktkFile := file("ktk.pem")
	got := run(envR, "receiver-ktk.log", true, receiverBin, "ktk", "--token", uri("receiver"), "--label", "ktk", "--key-import", pub, "--out", ktkFile)
	if !strings.Contains(got, "check value") {
		t.Fatalf("receiver ktk: %s", got)
	}
	// Ceremony 2: the KTK, trusted by the SO.
	issuer("ceremony-ktk.log", "ceremony", "run", script("ktk", fmt.Sprintf("ktks:\n  - label: ktk-bank\n    key-import: key-import\n    wrapped: %s\n    sender: the bank\n", ktkFile)))

	// 1000 cards, personalized and imported.
	pemBytes, err := os.ReadFile(file("issuer.pub.pem"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := protocol.ParseIssuerKeyPEM(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	p := protocol.ECDHP256AES
	cards, lines := soakCards(t, key, p, n)
	fp := key.Fingerprint()
	batchPath := cardtest.WriteBatch(t, p, fp[:], lines)
	os.Rename(batchPath, file("batch.ndjson"))
	os.Rename(batchPath+".manifest.json", file("batch.ndjson.manifest.json"))
	db := file("issuer-data")
	keyFlags := []string{"--token", uri("issuer"), "--kek", "kek", "--db", db}
	issuer("import.log", append([]string{"import", "--batch", file("batch.ndjson"), "--key", "issuer"}, keyFlags...)...)

	// The export.
	exp := file("export", "bank.ndjson")
	os.MkdirAll(filepath.Dir(exp), 0o700)
	got = issuer("export.log", append([]string{"export", "--ktk", "ktk-bank", "--state", "active", "--operator", "e2e test", "--out", exp}, keyFlags...)...)
	if !strings.Contains(got, fmt.Sprint(n)) {
		t.Errorf("issuer export says: %s", got)
	}
	m, err := export.ReadManifest(export.ManifestPath(exp))
	if err != nil || m.Count != n || m.KTK.Label != "ktk-bank" {
		t.Fatalf("the export's manifest: %+v, %v", m, err)
	}

	// A tampered copy: line 7's wrapped key changed (still well formed).
	tdir := file("tampered")
	os.MkdirAll(tdir, 0o700)
	raw, _ := os.ReadFile(exp)
	ls := bytes.SplitAfter(raw, []byte("\n"))
	r7, err := export.ParseRecord(bytes.TrimSuffix(ls[6], []byte("\n")))
	if err != nil {
		t.Fatal(err)
	}
	r7.Wrapped[3] ^= 0x40
	if ls[6], err = export.MarshalRecord(r7); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(tdir, "bank.ndjson"), bytes.Join(ls, nil), 0o600)
	mb, _ := os.ReadFile(export.ManifestPath(exp))
	os.WriteFile(filepath.Join(tdir, "bank.ndjson.manifest.json"), mb, 0o600)
	got = run(envR, "receiver-import-tampered.log", false, receiverBin, "import", "--token", uri("receiver"), "--ktk", "ktk", filepath.Join(tdir, "bank.ndjson.manifest.json"))
	if !strings.Contains(got, fmt.Sprintf("line 7 (card %x): refused: ", []byte(r7.ID))) || !strings.Contains(got, "the token refused the wrapped key (RFC 3394 integrity check") ||
		!strings.Contains(got, fmt.Sprintf("%d imported, 1 refused", n-1)) || !strings.Contains(got, "not the one the manifest describes") {
		t.Fatalf("the tampered export at the receiver:\n%s", got)
	}
	// The genuine file: the one key missing lands, the rest are there.
	got = run(envR, "receiver-import.log", true, receiverBin, "import", "--token", uri("receiver"), "--ktk", "ktk", export.ManifestPath(exp))
	if !strings.Contains(got, fmt.Sprintf("%d imported, 0 refused", n)) {
		t.Fatalf("the export at the receiver:\n%s", got)
	}

	// Every card authenticates at the receiver: through the CLI for a
	// few, through package receiver (the CLI's code) for all.
	keys := map[string][]byte{}
	for i, c := range cards[:3] {
		ch := make([]byte, protocol.ChallengeLen)
		rand.Read(ch)
		mac, _ := protocol.AuthMAC(c.ki, c.id, ch)
		got := run(envR, fmt.Sprintf("receiver-verify-%d.log", i), true, receiverBin, "verify", "--token", uri("receiver"),
			"--id", hex.EncodeToString(c.id), "--challenge", hex.EncodeToString(ch), "--mac", hex.EncodeToString(mac))
		if strings.TrimSpace(got) != "ok" {
			t.Fatalf("receiver verify card %x: %s", c.id, got)
		}
		mac[0] ^= 1
		run(envR, fmt.Sprintf("receiver-verify-forged-%d.log", i), false, receiverBin, "verify", "--token", uri("receiver"),
			"--id", hex.EncodeToString(c.id), "--challenge", hex.EncodeToString(ch), "--mac", hex.EncodeToString(mac))
	}
	for _, kv := range envR {
		if v, ok := strings.CutPrefix(kv, "SOFTHSM2_CONF="); ok {
			t.Setenv("SOFTHSM2_CONF", v)
		}
	}
	rtok, err := hsm.OpenURI(uri("receiver"), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer rtok.Close()
	for _, c := range cards {
		ch := make([]byte, protocol.ChallengeLen)
		rand.Read(ch)
		mac, _ := protocol.AuthMAC(c.ki, c.id, ch)
		if ok, err := receiver.Verify(context.Background(), rtok, c.id, ch, mac); err != nil || !ok {
			t.Fatalf("card %x does not authenticate at the receiver: %v %v", c.id, ok, err)
		}
		keys[hex.EncodeToString(c.id)] = c.ki
	}
	t.Logf("%d cards exported and authenticated at the receiver", n)

	// No K_I in any file the run wrote.
	found, scanned, err := scanForKeys(out, keys)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Error(f)
	}
	have := strings.Join(scanned, "\n") + "\n"
	for _, want := range []string{"export/bank.ndjson", "export/bank.ndjson.manifest.json", "tampered/bank.ndjson", "ktk.pem",
		"issuer-data/issuer.db", "ceremony/ktk/transcript.json", "logs/export.log", "logs/receiver-import.log"} {
		if !strings.Contains(have, want+"\n") {
			t.Errorf("the run left no %s to scan", want)
		}
	}
	t.Logf("%d files scanned for %d cards' K_I in 7 encodings", len(scanned), len(keys))
}
