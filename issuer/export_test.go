package issuer

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/export"
	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
	"blindperso/receiver"
)

// expReceiverKTK is the label of the receiver's KTK (package receiver,
// on a SoftHSM2 token of its own: a token object, so it outlives the
// recycling of the library the issuer's token shares in this process).
const expReceiverKTK = "receiver-ktk"

func battr(t uint, v any) *pkcs11.Attribute { return pkcs11.NewAttribute(t, v) }

// rcvVerify has the receiver verify mac with the K_I of record r.
func (g *expRig) rcvVerify(tb testing.TB, r export.Record, challenge, mac []byte) bool {
	tb.Helper()
	ok, err := receiver.Check(context.Background(), g.rcv, expReceiverKTK, r, challenge, mac)
	if err != nil {
		tb.Fatal(err)
	}
	return ok
}

// expRig is an issuer token with a key, a KEK and the receiver's KTK
// imported under a key-import key as the ceremony does it (trusted by the
// SO on SoftHSM2), and the receiver.
type expRig struct {
	uri, soPIN string
	tok        *hsm.Token
	is         *Issuer
	kek        *hsm.KEKRef
	ktk        *hsm.KTKRef
	rcv        *hsm.Token // the receiver's token
}

func newExpRig(tb testing.TB, kind string, sessions int) *expRig {
	tb.Helper()
	ctx := context.Background()
	var ht hsmtest.Token
	if kind == tokSoftHSM2 {
		ht = hsmtest.SoftHSM(tb)
	} else {
		ht = hsmtest.NSS(tb)
	}
	// Every SoftHSM2 token before the first is opened: the library lists
	// them once, at C_Initialize.
	rt := hsmtest.SoftHSM(tb)
	g := &expRig{uri: ht.URI, soPIN: ht.SOPIN}
	tok, err := hsm.OpenURI(ht.URI, sessions)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { tok.Close() })
	g.tok = tok
	if g.rcv, err = hsm.OpenURI(rt.URI, 1); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { g.rcv.Close() })
	sfx := fmt.Sprintf("-%x", time.Now().UnixNano()) // the NSS database is shared
	key, err := tok.GenerateIssuerKey(ctx, hsm.KindP256, "issuer"+sfx)
	if err != nil {
		tb.Fatal(err)
	}
	if g.kek, err = tok.GenerateKEK(ctx, "kek"+sfx, ht.SOPIN); err != nil {
		tb.Fatal(err)
	}
	ik, err := tok.GenerateKeyImportKey(ctx, "key-import"+sfx)
	if err != nil {
		tb.Fatal(err)
	}
	sent, err := receiver.MakeKTK(ctx, g.rcv, expReceiverKTK, ik.Public.RSA)
	if err != nil {
		tb.Fatal(err)
	}
	if g.ktk, err = tok.ImportKTK(ctx, ik, "ktk-bank"+sfx, sent.Wrapped, ht.SOPIN); err != nil {
		tb.Fatal(err)
	}
	if found, err := FindKTK(ctx, tok, g.ktk.Label); err != nil || found.Trusted != g.ktk.Trusted {
		tb.Fatalf("find KTK: %+v %v", found, err)
	}
	g.is = &Issuer{Token: tok, Key: key, KEK: g.kek}
	tb.Cleanup(func() { g.is.Close(ctx) })
	return g
}

func (g *expRig) exporter(st Store) *Exporter {
	return &Exporter{Store: st, Token: g.tok, KEK: g.kek, KTK: g.ktk, Workers: 2, Operator: "tester",
		page: 7, SyncEvery: 5, recycle: 13}
}

// checkExport reads the export at out (export.Read: every line, and the
// file against its manifest) and has the receiver verify every card's
// MAC over a fresh challenge with the exported key (and refuse one
// forged MAC); the lines' Ids must be want, in that order.
func checkExport(t *testing.T, g *expRig, out string, want [][]byte, ki map[string][]byte) export.Manifest {
	t.Helper()
	var got [][]byte
	forged := false
	m, err := export.Read(export.ManifestPath(out), func(line int, r export.Record, err error) error {
		if err != nil {
			return err
		}
		got = append(got, r.ID)
		if r.Profile != protocol.ECDHP256AES.Name {
			t.Errorf("line %d: profile %q", line, r.Profile)
		}
		ch := make([]byte, protocol.ChallengeLen)
		rand.Read(ch)
		mac, err := protocol.AuthMAC(ki[string(r.ID)], r.ID, ch)
		if err != nil {
			return err
		}
		if !g.rcvVerify(t, r, ch, mac) {
			t.Errorf("line %d: card %x's MAC does not verify at the receiver with the exported key", line, []byte(r.ID))
		}
		if !forged {
			forged = true
			mac[0] ^= 1
			if g.rcvVerify(t, r, ch, mac) {
				t.Errorf("line %d: a forged MAC verifies at the receiver", line)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d lines, want %d", out, len(got), len(want))
	}
	for i := range got {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("%s line %d: card %x, want %x", out, i+1, got[i], want[i])
		}
	}
	if m.KTK.Label != g.ktk.Label || !bytes.Equal(m.KTK.CheckValue, g.ktk.CheckValue) || m.Issuer != g.tok.Info().Label {
		t.Fatalf("manifest %+v", m)
	}
	return m
}

func sortedIDs(cards []hostCard) [][]byte {
	var ids [][]byte
	for _, c := range cards {
		ids = append(ids, c.id)
	}
	sort.Slice(ids, func(i, j int) bool { return bytes.Compare(ids[i], ids[j]) < 0 })
	return ids
}

func kiMap(cards ...[]hostCard) map[string][]byte {
	m := map[string][]byte{}
	for _, cs := range cards {
		for _, c := range cs {
			m[string(c.id)] = c.ki
		}
	}
	return m
}

func batchID(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return fmt.Sprintf("%x", sum)
}

// TestExport: on SoftHSM2 (SQLite and PostgreSQL) and NSS softokn
// (SQLite), two batches of host-made cards imported, some blocked; the
// exports by batch, by Id list and by state write exactly the selected
// cards in Id order, every exported key opens at the receiver's token and
// verifies its card's MAC; the same export again is the same bytes
// (RFC 3394); the store logs every export with its cards, count and
// SHA-256; no file holds any K_I.
func TestExport(t *testing.T) {
	cases := []struct {
		kind  string
		store []storeKind
	}{
		{tokSoftHSM2, storeKinds},
		{tokNSS, storeKinds[:1]},
	}
	for _, tc := range cases {
		t.Run(tc.kind, func(t *testing.T) {
			g := newExpRig(t, tc.kind, 2)
			p := protocol.ECDHP256AES
			src := t.TempDir()
			a, pathA := hostBatch(t, g.is, p, 40, 1, src)
			b, pathB := hostBatch(t, g.is, p, 20, 1000, src)
			ki := kiMap(a, b)
			for _, k := range tc.store {
				t.Run(k.name, func(t *testing.T) {
					ctx := context.Background()
					db, files := k.open(t)
					st := openStore(t, db)
					importAll(t, g.is, st, pathA)
					importAll(t, g.is, st, pathB)
					var blocked []hostCard
					for _, i := range []int{3, 9, 17, 30} {
						if _, err := st.BlockCard(ctx, a[i].id, "test", time.Now()); err != nil {
							t.Fatal(err)
						}
						blocked = append(blocked, a[i])
					}
					blocked = append(blocked, b[5])
					if _, err := st.BlockCard(ctx, b[5].id, "test", time.Now()); err != nil {
						t.Fatal(err)
					}
					dir := t.TempDir()
					ex := g.exporter(st)
					var progress []ExportProgress
					ex.Progress = func(p ExportProgress) { progress = append(progress, p) }

					// By batch.
					outA := filepath.Join(dir, "batch-a.ndjson")
					res, err := ex.Export(ctx, ExportSelection{Batch: batchID(t, pathA)}, outA)
					if err != nil {
						t.Fatal(err)
					}
					if res.Resumed != 0 || res.Written != len(a) || res.Manifest.Count != len(a) || res.File != outA {
						t.Fatalf("result %+v", res)
					}
					if len(progress) == 0 || progress[len(progress)-1].Done != len(a) || progress[0].Total != len(a) {
						t.Errorf("progress %v", progress)
					}
					m := checkExport(t, g, outA, sortedIDs(a), ki)
					if m.Select != "batch "+batchID(t, pathA) {
						t.Errorf("selection %q", m.Select)
					}
					if _, err := os.Stat(export.PartialPath(outA)); !os.IsNotExist(err) {
						t.Errorf("partial file left: %v", err)
					}

					// The same again: the same bytes.
					again := filepath.Join(dir, "batch-a-again.ndjson")
					if _, err := ex.Export(ctx, ExportSelection{Batch: batchID(t, pathA)}, again); err != nil {
						t.Fatal(err)
					}
					if x, y := readFile(t, outA), readFile(t, again); !bytes.Equal(x, y) {
						t.Error("two exports of one batch under one KTK differ")
					}

					// By Id list: unsorted, from both batches, comments and
					// blank lines.
					list := filepath.Join(dir, "ids.txt")
					pick := []hostCard{b[7], a[2], a[39], b[0], a[17]}
					var lb strings.Builder
					lb.WriteString("# cards for the bank\n\n")
					for i, c := range pick {
						fmt.Fprintf(&lb, "  %X  # card %d\n", c.id, i)
					}
					os.WriteFile(list, []byte(lb.String()), 0o600)
					sel, err := ReadIDList(list)
					if err != nil {
						t.Fatal(err)
					}
					outIDs := filepath.Join(dir, "ids.ndjson")
					if _, err := ex.Export(ctx, sel, outIDs); err != nil {
						t.Fatal(err)
					}
					m = checkExport(t, g, outIDs, sortedIDs(pick), ki)
					if !strings.HasPrefix(m.Select, "ids from ids.txt (5 cards, SHA-256 ") {
						t.Errorf("selection %q", m.Select)
					}

					// By state.
					outBlocked := filepath.Join(dir, "blocked.ndjson")
					if _, err := ex.Export(ctx, ExportSelection{State: StateBlocked}, outBlocked); err != nil {
						t.Fatal(err)
					}
					checkExport(t, g, outBlocked, sortedIDs(blocked), ki)
					outActive := filepath.Join(dir, "active.ndjson")
					if _, err := ex.Export(ctx, ExportSelection{State: StateActive}, outActive); err != nil {
						t.Fatal(err)
					}
					isBlocked := map[string]bool{}
					for _, c := range blocked {
						isBlocked[string(c.id)] = true
					}
					var active []hostCard
					for _, c := range append(append([]hostCard{}, a...), b...) {
						if !isBlocked[string(c.id)] {
							active = append(active, c)
						}
					}
					checkExport(t, g, outActive, sortedIDs(active), ki)

					// The store's log.
					es, err := st.Exports(ctx)
					if err != nil {
						t.Fatal(err)
					}
					wantFiles := []string{outA, again, outIDs, outBlocked, outActive}
					if len(es) != len(wantFiles) {
						t.Fatalf("%d exports logged, want %d", len(es), len(wantFiles))
					}
					for i, e := range es {
						mf, err := export.ReadManifest(export.ManifestPath(wantFiles[i]))
						if err != nil {
							t.Fatal(err)
						}
						if e.Status != ExportDone || e.File != wantFiles[i] || e.Count != mf.Count || !bytes.Equal(e.SHA256, mf.SHA256) ||
							e.Operator != "tester" || e.KTK != g.ktk.Label || !bytes.Equal(e.KTKCheckValue, g.ktk.CheckValue) ||
							e.KEK != g.kek.Label || e.Issuer != g.tok.Info().Label || e.Selection != mf.Select ||
							e.Finished.IsZero() || e.Finished.Before(e.Started) || len(e.ID) != 32 {
							t.Errorf("export %d: %+v, manifest %+v", i, e, mf)
						}
						ids := exportedIDs(t, st, e.ID)
						var inFile [][]byte
						export.Read(export.ManifestPath(wantFiles[i]), func(_ int, r export.Record, _ error) error {
							inFile = append(inFile, r.ID)
							return nil
						})
						if fmt.Sprint(ids) != fmt.Sprint(inFile) {
							t.Errorf("export %d: the store logs cards %x, the file has %x", i, ids, inFile)
						}
					}
					assertNoHostKI(t, k.name, files, append(append([]hostCard{}, a...), b...), dir)
				})
			}
		})
	}
}

func exportedIDs(t *testing.T, st Store, id string) [][]byte {
	t.Helper()
	var out [][]byte
	var after []byte
	for {
		page, err := st.ExportedCards(context.Background(), id, after, 3)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			return out
		}
		for _, h := range page {
			out = append(out, h)
		}
		after = page[len(page)-1]
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestExportRefusals: what a person gets wrong is refused before any
// token work — no partial file, no export logged — with words that say
// what to do: an untrusted KTK on SoftHSM2, a KEK given as the KTK, a KTK
// that is not there, an unknown Id (named, ErrNotFound), an unknown batch,
// a selection that matches no card, none or two selections, an existing
// OUT, a partial file of other arguments or of no export of this store.
func TestExportRefusals(t *testing.T) {
	g := newExpRig(t, tokSoftHSM2, 2)
	ctx := context.Background()
	a, path := hostBatch(t, g.is, protocol.ECDHP256AES, 12, 1, t.TempDir())
	st := openStore(t, filepath.Join(t.TempDir(), "data"))
	importAll(t, g.is, st, path)
	dir := t.TempDir()

	// A KTK of a PIN holder's own: created with its value, untrusted.
	mine := "ktk-mine"
	err := g.tok.With(ctx, func(s hsm.Session) error {
		v := make([]byte, hsm.KTKLen)
		rand.Read(v)
		_, err := s.P.CreateObject(s.H, []*pkcs11.Attribute{
			battr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), battr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			battr(pkcs11.CKA_TOKEN, true), battr(pkcs11.CKA_PRIVATE, true), battr(pkcs11.CKA_LABEL, mine),
			battr(pkcs11.CKA_ID, []byte("mine")), battr(pkcs11.CKA_SENSITIVE, true),
			battr(pkcs11.CKA_WRAP, true), battr(pkcs11.CKA_UNWRAP, false), battr(pkcs11.CKA_VALUE, v)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	untrusted, err := FindKTK(ctx, g.tok, mine)
	if err != nil || untrusted.Trusted {
		t.Fatalf("the PIN holder's KTK: %+v %v", untrusted, err)
	}

	for _, c := range []struct{ label, want string }{
		{g.kek.Label, "not a KEK"},
		{"no-such-ktk", "key ceremony"},
	} {
		if _, err := FindKTK(ctx, g.tok, c.label); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("FindKTK(%q): %v, want %q", c.label, err, c.want)
		}
	}

	unknown := filepath.Join(dir, "unknown.txt")
	os.WriteFile(unknown, []byte(fmt.Sprintf("%x\nB2FFFF\n%x\n", a[0].id, a[1].id)), 0o600)
	unknownSel, err := ReadIDList(unknown)
	if err != nil {
		t.Fatal(err)
	}
	existing := filepath.Join(dir, "existing.ndjson")
	os.WriteFile(existing, []byte("x"), 0o600)
	foreign := filepath.Join(dir, "foreign.ndjson")
	os.WriteFile(export.PartialPath(foreign), nil, 0o600)
	batch := ExportSelection{Batch: batchID(t, path)}

	for _, c := range []struct {
		name     string
		ktk      *hsm.KTKRef
		sel      ExportSelection
		out      string
		want     string
		notFound bool
	}{
		{"untrusted KTK", untrusted, batch, "", `"ktk-mine" is not CKA_TRUSTED`, false},
		{"KEK as KTK", &hsm.KTKRef{Label: g.kek.Label, Trusted: true}, batch, "", "both the KEK and the KTK", false},
		{"unknown Id", g.ktk, unknownSel, "", "1 Ids of unknown.txt are not in this store: b2ffff", true},
		{"unknown batch", g.ktk, ExportSelection{Batch: "00ff"}, "", "batch 00ff: not found in this store", true},
		{"empty selection", g.ktk, ExportSelection{State: StateConflict}, "", "(state conflict) matches no card", false},
		{"no selection", g.ktk, ExportSelection{}, "", "exactly one of", false},
		{"two selections", g.ktk, ExportSelection{Batch: batch.Batch, State: StateActive}, "", "exactly one of", false},
		{"bad state", g.ktk, ExportSelection{State: "lost"}, "", `state "lost"`, false},
		{"existing OUT", g.ktk, batch, existing, "existing.ndjson exists: an export is never overwritten", false},
		{"foreign partial", g.ktk, batch, foreign, "this store has no unfinished export", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			ex := g.exporter(st)
			ex.KTK = c.ktk
			out := c.out
			if out == "" {
				out = filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".ndjson")
			}
			_, err := ex.Export(ctx, c.sel, out)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("%v, want %q", err, c.want)
			}
			if errors.Is(err, ErrNotFound) != c.notFound {
				t.Errorf("ErrNotFound %v, want %v: %v", errors.Is(err, ErrNotFound), c.notFound, err)
			}
			if c.out == "" {
				if _, err := os.Lstat(export.PartialPath(out)); err == nil {
					t.Error("a partial file was written")
				}
			}
			if es, _ := st.Exports(ctx); len(es) != 0 {
				t.Errorf("%d exports logged", len(es))
			}
		})
	}

	for _, c := range []struct{ content, want string }{
		{"zz\n", `line 1: "zz" is not a card Id`},
		{"ab\n# c\nAB\n", "line 3: card ab is listed twice (also line 1)"},
	} {
		p := filepath.Join(dir, "list.txt")
		os.WriteFile(p, []byte(c.content), 0o600)
		if _, err := ReadIDList(p); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ReadIDList(%q): %v, want %q", c.content, err, c.want)
		}
	}

	// An interrupted export, then one of other arguments to the same
	// file: refused while the partial file is there; the same
	// arguments finish it, byte for byte as an uninterrupted run.
	ref := filepath.Join(dir, "ref.ndjson")
	if _, err := g.exporter(st).Export(ctx, batch, ref); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "interrupted.ndjson")
	cctx, cancel := context.WithCancel(ctx)
	ex := g.exporter(st)
	ex.afterRecord = func(n int) {
		if n == 7 {
			cancel()
		}
	}
	if _, err := ex.Export(cctx, batch, out); err == nil || !strings.Contains(err.Error(), "run the same command again") {
		t.Fatalf("cancelled export: %v", err)
	}
	if _, err := g.exporter(st).Export(ctx, ExportSelection{State: StateActive}, out); err == nil ||
		!strings.Contains(err.Error(), "is an unfinished export of batch "+batch.Batch) {
		t.Fatalf("other arguments: %v", err)
	}
	res, err := g.exporter(st).Export(ctx, batch, out)
	if err != nil {
		t.Fatal(err)
	}
	if res.Resumed < 5 || res.Resumed+res.Written != len(a) {
		t.Fatalf("resumed %+v", res)
	}
	if !bytes.Equal(readFile(t, ref), readFile(t, out)) {
		t.Fatal("the resumed export differs from the uninterrupted one")
	}
	// Abandoned: a partial file removed, another export to the same file.
	out2 := filepath.Join(dir, "abandoned.ndjson")
	cctx, cancel = context.WithCancel(ctx)
	ex = g.exporter(st)
	ex.afterRecord = func(n int) {
		if n == 3 {
			cancel()
		}
	}
	ex.Export(cctx, batch, out2)
	os.Remove(export.PartialPath(out2))
	if _, err := g.exporter(st).Export(ctx, ExportSelection{State: StateActive}, out2); err != nil {
		t.Fatal(err)
	}
	es, err := st.Exports(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var statuses []string
	for _, e := range es {
		statuses = append(statuses, e.Status)
	}
	if got := strings.Join(statuses, " "); got != "done done abandoned done" {
		t.Fatalf("statuses %s", got)
	}
}

// The crash test: a child process exporting (slowed down) is killed with
// SIGKILL three times at growing points of its run, the partial file's
// end is torn each time as a write cut short leaves it (once cut back to
// before cards the store logged), and a last run finishes: the file is byte for byte the one an uninterrupted export
// writes, the same export row was continued throughout, and the store
// logs exactly the file's cards.
const exportChildEnv = "ISSUER_TEST_EXPORT_CHILD"

type exportChildArgs struct {
	URI, DB, KEK, KTK, Batch, Out string
}

func exportChild() int {
	var a exportChildArgs
	if err := json.Unmarshal([]byte(os.Getenv(exportChildEnv)), &a); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	tok, err := hsm.OpenURI(a.URI, 2)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	kek, err := tok.FindKEK(ctx, a.KEK)
	if err == nil {
		var ktk *hsm.KTKRef
		if ktk, err = FindKTK(ctx, tok, a.KTK); err == nil {
			var st Store
			if st, err = Open(ctx, a.DB); err == nil {
				ex := &Exporter{Store: st, Token: tok, KEK: kek, KTK: ktk, Workers: 2, Operator: "child", SyncEvery: 16, page: 50,
					afterRecord: func(int) { time.Sleep(2 * time.Millisecond) }}
				_, err = ex.Export(ctx, ExportSelection{Batch: a.Batch}, a.Out)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func TestExportKill9(t *testing.T) {
	const n = 400
	g := newExpRig(t, tokSoftHSM2, 2)
	cards, path := hostBatch(t, g.is, protocol.ECDHP256AES, n, 1, t.TempDir())
	batch := ExportSelection{Batch: batchID(t, path)}
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) {
			ctx := context.Background()
			db, files := k.open(t)
			st := openStore(t, db)
			importAll(t, g.is, st, path)
			dir := t.TempDir()
			ref := filepath.Join(dir, "ref.ndjson")
			if _, err := g.exporter(st).Export(ctx, batch, ref); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out.ndjson")
			arg, _ := json.Marshal(exportChildArgs{URI: g.uri, DB: db, KEK: g.kek.Label, KTK: g.ktk.Label, Batch: batch.Batch, Out: out})
			lineLen := len(readFile(t, ref)) / n
			var exportID string
			for i, at := range []int{60, 170, 290} {
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), exportChildEnv+"="+string(arg))
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				exited := make(chan error, 1)
				go func() { exited <- cmd.Wait() }()
				deadline := time.Now().Add(60 * time.Second)
			wait:
				for {
					select {
					case err := <-exited:
						t.Fatalf("run %d: the child ended before it was killed: %v; stderr: %s", i+1, err, stderr.String())
					default:
					}
					if fi, err := os.Stat(export.PartialPath(out)); err == nil && int(fi.Size()) >= at*lineLen {
						break wait
					}
					if time.Now().After(deadline) {
						cmd.Process.Kill()
						t.Fatalf("run %d: no %d lines in 60 s; stderr: %s", i+1, at, stderr.String())
					}
					time.Sleep(2 * time.Millisecond)
				}
				cmd.Process.Signal(syscall.SIGKILL)
				<-exited
				// A write cut short: the last line torn (if it is not
				// already).
				pp := export.PartialPath(out)
				b := readFile(t, pp)
				es, err := st.Exports(ctx)
				if err != nil || len(es) != 2 || es[1].Status != ExportRunning {
					t.Fatalf("after kill %d: exports %+v %v", i+1, es, err)
				}
				if exportID == "" {
					exportID = es[1].ID
				} else if es[1].ID != exportID {
					t.Fatalf("kill %d: another export row %s, want %s continued", i+1, es[1].ID, exportID)
				}
				logged := exportedIDs(t, st, exportID)
				cut := len(b) - 11
				if i == 1 {
					// More lost than the store logged (the file's last
					// syncs lost, as no crash of this program loses
					// them): the rerun forgets the store's extra cards
					// and writes them again.
					cut = lineLen*(len(logged)-5) + 40
				}
				if err := os.Truncate(pp, int64(cut)); err != nil {
					t.Fatal(err)
				}
				t.Logf("kill %d: %d bytes in the partial file (%d lines), torn to %d; %d cards logged", i+1, len(b), bytes.Count(b, []byte("\n")), cut, len(logged))
			}
			res, err := g.exporter(st).Export(ctx, batch, out)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("final run: %d resumed (torn line of %d bytes cut), %d written", res.Resumed, res.TornBytes, res.Written)
			if res.ID != exportID || res.Resumed == 0 || res.Resumed+res.Written != n || res.TornBytes == 0 {
				t.Fatalf("final run %+v", res)
			}
			if !bytes.Equal(readFile(t, ref), readFile(t, out)) {
				t.Fatal("the export killed and resumed differs from the uninterrupted one")
			}
			mr, _ := export.ReadManifest(export.ManifestPath(ref))
			mo, _ := export.ReadManifest(export.ManifestPath(out))
			mr.Written, mo.Written, mr.File, mo.File = time.Time{}, time.Time{}, "", ""
			if fmt.Sprint(mr) != fmt.Sprint(mo) {
				t.Fatalf("manifests differ:\n%+v\n%+v", mr, mo)
			}
			if got, want := fmt.Sprint(exportedIDs(t, st, exportID)), fmt.Sprint(sortedIDs(cards)); got != want {
				t.Fatal("the store's log of the export is not the file's cards")
			}
			es, _ := st.Exports(ctx)
			if es[1].Status != ExportDone || es[1].Count != n || !bytes.Equal(es[1].SHA256, mo.SHA256) {
				t.Fatalf("export row %+v", es[1])
			}
			assertNoHostKI(t, k.name, files, cards, dir)
		})
	}
}
