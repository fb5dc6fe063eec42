package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"blindperso/card"
	"blindperso/card/cardtest"
	"blindperso/issuer"
	"blindperso/protocol"
)

// Sizes of the run: small, so that each mode stays well under a minute.
const (
	demoCards    = 6
	demoAttacked = 2
)

// TestDemo runs the whole main job as `make demo` does — fresh token and
// key ceremony, private pcscd with two vpcd readers, the station over both,
// the issuer service importing and authenticating through its API, and the
// active insider of the paper's Fig. 2 — on SoftHSM2 and on NSS softokn
// (paper-exact rsa-raw-sha1, and the SP 800-108 profile rsa-oaep-kbkdf),
// and then checks on everything the run left:
//
//   - passive insider (paper §4.2): no card's K_I, in any encoding, in any
//     file of the run but the cards' own state files and the token;
//   - active insiders (§4.3, Fig. 2; PROTOCOL.md §10): the chips are
//     attested, so the Fig. 2 cards, the replaced record (emulated clone)
//     and the injected one are refused at import and absent from the
//     issuer's store; every honest card is there, active and attested.
//
// Like every PC/SC test it needs root or user namespaces (the demo's
// pcscd runs in its own mount namespace); -short skips it.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("runs pcscd, tokens and the issuer service (not with -short)")
	}
	root := repoRoot(t)
	bin := t.TempDir()
	build := exec.Command(goTool(), "build", "-o", bin+string(filepath.Separator),
		"./cmd/issuer", "./cmd/perso", "./cmd/vcard", "./cmd/insider")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, mode := range []struct {
		name, profile string
		args          []string
	}{
		{"softhsm2", "rsa-oaep-aes", nil},
		{"nss", "rsa-raw-sha1", []string{"--nss"}},
		// An SP 800-108 profile (PROTOCOL.md §3.3, kbkdf), in NSS's token.
		{"nss-kbkdf", "rsa-oaep-kbkdf", []string{"--nss"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			out := t.TempDir()
			log := runDemo(t, root, bin, out, mode.args, "DEMO_PROFILE="+mode.profile)
			checkSummary(t, log, strings.TrimSuffix(mode.name, "-kbkdf"), mode.profile)
			honest, attacked, victims := cardKeys(t, out)
			checkNoKI(t, out, honest, attacked, victims)
			checkStates(t, out, honest, attacked, victims)
		})
	}
}

// runDemo runs scripts/demo.sh with the built commands into out and
// returns its output; any exit but 0 fails the test.
func runDemo(t *testing.T, root, bin, out string, args []string, extra ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", append([]string{"scripts/demo.sh"}, args...)...)
	cmd.Dir = root
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DEMO_") && !strings.HasPrefix(kv, "BIN=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "BIN="+bin, "DEMO_OUT="+out,
		"DEMO_CARDS="+strconv.Itoa(demoCards), "DEMO_ATTACKED="+strconv.Itoa(demoAttacked), "DEMO_TIMEOUT=60")
	cmd.Env = append(cmd.Env, extra...)
	// On timeout, SIGTERM: the script's trap stops its pcscd, feeders
	// and issuer service.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	start := time.Now()
	err := cmd.Run()
	t.Logf("demo.sh %s: %.1f s", strings.Join(args, " "), time.Since(start).Seconds())
	if err != nil {
		t.Fatalf("demo.sh %s: %v\n%s", strings.Join(args, " "), err, buf.String())
	}
	return buf.String()
}

// checkSummary reads the summary table.
func checkSummary(t *testing.T, log, token, profile string) {
	t.Helper()
	for _, re := range []string{
		`== summary: ` + token + ` token, profile ` + profile,
		`cards personalized \(honest station\) +6 of 6\n`,
		`imported by the issuer \(K_I derived in-token\) +6\n`,
		`authenticated in-token \(honest\) +6 of 6\n`,
		`with a verified chip attestation +6 of 6\n`,
		`attacked \(personalized under the insider's key\) +2 of 2\n`,
		`Fig. 2: refused at import \(PK substitution\) +2 of 2\n`,
		`record replaced \(emulated clone\), refused +1 of 1\n`,
		`record injected \(no genuine chip\), refused +1 of 1\n`,
		`honest cards still active +6 of 6\n`,
		`time taken +[0-9.]+ s\n`,
		`result +PASS\n`,
		`a100000000000001  not imported \(refused at import\)\n`,
		`the card was personalized under another issuer key \(fingerprint [0-9a-f]{64}\): the station is under attack`,
		`refused: attestation: the record's c is not the one the chip made .*: the record was replaced\n`,
		`the clone at the issuer: no challenge: the issuer has no card c100000000000001 \(404\)\n`,
	} {
		if !regexp.MustCompile(re).MatchString(log) {
			t.Errorf("demo output lacks %q:\n%s", re, log)
		}
	}
}

// cardKeys reads K_I from every virtual card's state file (only the test
// may: it plays the card's EEPROM), by card Id: the honest cards, the
// Fig. 2 insider's, and the two genuine cards of the clone attack.
func cardKeys(t *testing.T, out string) (honest, attacked, victims map[string][]byte) {
	t.Helper()
	read := func(dir string, want int) map[string][]byte {
		paths, _ := filepath.Glob(filepath.Join(out, "cards", dir, "*.json"))
		if len(paths) != want {
			t.Fatalf("%d card state files in cards/%s, want %d", len(paths), dir, want)
		}
		keys := map[string][]byte{}
		for _, p := range paths {
			a, err := card.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			ki := cardtest.KI(t, p)
			if len(ki) != protocol.KeySize {
				t.Fatalf("%s holds no K_I: was it personalized?", p)
			}
			keys[hex.EncodeToString(a.ID())] = ki
		}
		return keys
	}
	return read("honest", demoCards), read("attacked", demoAttacked), read("clone-victims", 2)
}

// checkNoKI is the passive insider of the issue: no card's K_I — the
// honest cards', nor the attacked cards' K_I′ that the insider could
// compute — raw, in hex (either case) or base64 (standard and URL, padded
// and raw) in any file the run wrote, except the cards' own state files
// and the token directory: journals, batches, manifests, the store's
// files (database and WAL), every log, the ceremony's outputs and
// transcript, the API's answers.
func checkNoKI(t *testing.T, out string, keyMaps ...map[string][]byte) {
	t.Helper()
	found, scanned, err := scanForKeys(out, keyMaps...)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Error(f)
	}
	// The scan covered what matters.
	have := strings.Join(scanned, "\n") + "\n"
	for _, want := range []string{
		"station/batch.ndjson", "station/batch.ndjson.manifest.json",
		"insider/batch.ndjson", "insider/batch.ndjson.manifest.json",
		"issuer-data/issuer.db", "ceremony/transcript.json", "probe.txt",
		"logs/perso.log", "logs/insider.log", "logs/issuer-serve.log", "logs/pcscd.log",
		"logs/feed-honest-0.log", "logs/feed-attacked-1.log",
		"api/import-station.json", "api/import-insider.json", "api/auth-honest.txt", "summary.txt",
		"clone/batch.ndjson", "clone/batch.ndjson.manifest.json", "api/import-clone.json", "logs/perso-clone.log",
	} {
		if !strings.Contains(have, want+"\n") {
			t.Errorf("the run left no %s to scan", want)
		}
	}
	t.Logf("%d files scanned for %d cards' K_I in 7 encodings: %s", len(scanned), keyCount(keyMaps), strings.Join(scanned, " "))
}

func keyCount(ms []map[string][]byte) int {
	n := 0
	for _, m := range ms {
		n += len(m)
	}
	return n
}

// scanForKeys searches every regular file under out but the token
// directory and the cards' state files (cards/*/card-*.json) for every
// key in keyMaps (card Id → K_I) in 7 encodings; it returns one line per
// finding and the files it read, relative to out.
func scanForKeys(out string, keyMaps ...map[string][]byte) (found, scanned []string, err error) {
	type form struct {
		card, enc string
		b         []byte
	}
	var forms []form
	for _, m := range keyMaps {
		for id, ki := range m {
			for enc, b := range cardtest.Encodings(ki) {
				forms = append(forms, form{id, enc, b})
			}
		}
	}
	token := filepath.Join(out, "token")
	cards := filepath.Join(out, "cards")
	err = filepath.WalkDir(out, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path == token {
				return filepath.SkipDir
			}
			return nil
		}
		// A card's own state file is the card: it holds K_I by design.
		if filepath.Dir(filepath.Dir(path)) == cards && strings.HasPrefix(d.Name(), "card-") && strings.HasSuffix(d.Name(), ".json") {
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(out, path)
		scanned = append(scanned, rel)
		for _, f := range forms {
			if bytes.Contains(b, f.b) {
				found = append(found, fmt.Sprintf("K_I of card %s (%s) found in %s", f.card, f.enc, rel))
			}
		}
		return nil
	})
	return found, scanned, err
}

// The scanner itself: a key planted in any of the 7 encodings, in a log
// or in a binary file, is found; the same key in a card's state file or
// in the token directory is not looked at.
func TestScannerFindsPlantedKeys(t *testing.T) {
	ki := []byte{0x00, 0xfb, 0xff, 0x3e, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0}
	keys := map[string][]byte{"b1": ki}
	h := hex.EncodeToString(ki)
	for i, enc := range []string{string(ki), h, strings.ToUpper(h),
		base64.StdEncoding.EncodeToString(ki), base64.RawStdEncoding.EncodeToString(ki),
		base64.URLEncoding.EncodeToString(ki), base64.RawURLEncoding.EncodeToString(ki)} {
		out := t.TempDir()
		for _, dir := range []string{"logs", "token", "cards/honest"} {
			os.MkdirAll(filepath.Join(out, dir), 0o755)
		}
		os.WriteFile(filepath.Join(out, "token", "key4.db"), []byte(enc), 0o644)
		os.WriteFile(filepath.Join(out, "cards", "honest", "card-B1.json"), []byte(enc), 0o644)
		os.WriteFile(filepath.Join(out, "logs", "x.log"), []byte("time=… msg=x v="+enc+"\n"), 0o644)
		found, scanned, err := scanForKeys(out, keys)
		if err != nil {
			t.Fatal(err)
		}
		if len(scanned) != 1 || len(found) == 0 || !strings.Contains(found[0], "logs/x.log") {
			t.Errorf("encoding %d: found %q in %q; want logs/x.log only", i, found, scanned)
		}
	}
}

// checkStates reads the issuer's store: no card of an attack in it, the
// honest cards active and attested.
func checkStates(t *testing.T, out string, honest, attacked, victims map[string][]byte) {
	t.Helper()
	ctx := context.Background()
	st, err := issuer.OpenSQLite(ctx, filepath.Join(out, "issuer-data"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	all, err := st.Cards(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	state := map[string]issuer.StoredCard{}
	for _, c := range all {
		state[hex.EncodeToString(c.ID)] = c
	}
	// The honest cards and the clone attack's untouched card.
	if len(state) != len(honest)+1 {
		t.Errorf("store holds %d cards, want %d", len(state), len(honest)+1)
	}
	for id := range attacked {
		if c, ok := state[id]; ok {
			t.Errorf("attacked card %s is in the store: %+v; want refused at import", id, c)
		}
	}
	for _, id := range []string{"c100000000000001", "c1000000000000ff"} {
		if c, ok := state[id]; ok {
			t.Errorf("card %s (record replaced, or injected) is in the store: %+v", id, c)
		}
	}
	if len(victims) != 2 {
		t.Errorf("%d genuine cards of the clone attack, want 2", len(victims))
	}
	honest["c100000000000002"] = victims["c100000000000002"]
	for id := range honest {
		if c, ok := state[id]; !ok || c.State != "active" || c.FailedAuth != 0 || !c.Attested {
			t.Errorf("honest card %s: %+v; want active, attested, no failure", id, c)
		}
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			t.Fatal("no go.mod above " + dir)
		}
	}
}

// goTool is the go command of the toolchain running the test.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}
