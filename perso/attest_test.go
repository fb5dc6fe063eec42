package perso_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/chipca"
	"blindperso/internal/iso7816"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

// chipCA is one test chip vendor for the whole binary (a CA is two
// P-256 keys and two certificates: cheap, but no need to redo it).
var chipCA = sync.OnceValues(func() (*chipca.CA, error) { return chipca.New("perso test vendor") })

func testCA(t testing.TB) *chipca.CA {
	t.Helper()
	ca, err := chipCA()
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// manufactureAttested makes n blank attested cards in dir with Ids
// prefix‖i, each with an attestation key and chain from testCA, and
// returns their state files.
func manufactureAttested(t testing.TB, dir string, prefix byte, n int) []string {
	t.Helper()
	ca := testCA(t)
	var paths []string
	for i := range n {
		id := []byte{0xB1, prefix, byte(i >> 8), byte(i)}
		cc, err := ca.NewCard(id, chipca.CertOptions{})
		if err != nil {
			t.Fatal(err)
		}
		at := card.Attestation(cc)
		p := filepath.Join(dir, fmt.Sprintf("card-%02x-%04d.json", prefix, i))
		a, err := card.Manufacture(p, card.Options{ID: id, Attestation: &at})
		if err != nil {
			t.Fatal(err)
		}
		if !a.Attested() {
			t.Fatal("manufactured card is not attested")
		}
		paths = append(paths, p)
	}
	return paths
}

// verifyAttested checks rec's attestation as an issuer does (PROTOCOL.md
// §10.4, with the test CA's root): the chain verifies to the root, the
// certificate names the Id, sig verifies over A, and the signed
// fingerprint and SHA-256(c) are the job's key and the record's c.
func verifyAttested(t testing.TB, job perso.Job, rec batch.Record) {
	t.Helper()
	a := rec.Attestation
	if a == nil {
		t.Fatalf("card %x: record has no attestation", []byte(rec.ID))
	}
	if rec.V != batch.Version2 {
		t.Errorf("card %x: attested record of version %d", []byte(rec.ID), rec.V)
	}
	leaf, err := x509.ParseCertificate(a.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	for _, der := range a.Chain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: testCA(t).Roots(), Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("card %x: chain does not verify: %v", []byte(rec.ID), err)
	}
	if err := perso.CheckAttestation(rec); err != nil {
		t.Errorf("card %x: %v", []byte(rec.ID), err)
	}
	fp := job.Key.Fingerprint()
	ch := sha256.Sum256(rec.C)
	if !bytes.Equal(a.Fingerprint, fp[:]) || !bytes.Equal(a.CSHA256, ch[:]) {
		t.Errorf("card %x: signed fingerprint %x, SHA-256(c) %x; want %x, %x", []byte(rec.ID), []byte(a.Fingerprint), []byte(a.CSHA256), fp, ch)
	}
}

// batchLines returns the batch's lines (without '\n').
func batchLines(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// Attested and unattested cards in one run: each ends locked with one
// version 2 record; an attested card's record carries an attestation
// that verifies, an unattested card's has no attestation member; the
// manifest is of format 2; nothing holds a K_I.
func TestAttestedCards(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	attested := manufactureAttested(t, dir, 0xA1, 6)
	plain := manufacture(t, dir, 0xA2, 6)
	paths := append(append([]string(nil), attested...), plain...)
	batchPath := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batchPath, log)
	var cards []persotest.LocalCard
	for i := range attested {
		cards = append(cards, persotest.AppletCard(open(t, attested[i])), persotest.AppletCard(open(t, plain[i])))
	}
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	runLocal(t, st, 4, hopper(cards...))
	m, err := perso.WriteManifest(j, "test")
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
	if m.Format != batch.Format2 {
		t.Errorf("manifest format %q", m.Format)
	}
	recs := checkFinal(t, batchPath, paths)
	isAttested := map[string]bool{}
	for _, p := range attested {
		isAttested[hex.EncodeToString(open(t, p).ID())] = true
	}
	for _, r := range recs {
		if isAttested[hex.EncodeToString(r.ID)] {
			verifyAttested(t, job, r)
		} else if r.Attestation != nil || r.V != 2 {
			t.Errorf("unattested card %x: record of version %d with attestation %v", []byte(r.ID), r.V, r.Attestation)
		}
	}
	for _, l := range batchLines(t, batchPath) {
		if !strings.HasPrefix(l, `{"v":2,`) {
			t.Errorf("line not of version 2: %.60s", l)
		}
		if id := l[strings.Index(l, `"id":"`)+6:][:8]; strings.Contains(l, `"attestation"`) != isAttested[id] {
			t.Errorf("card %s: attestation member present = %v, card attested = %v", id, !isAttested[id], isAttested[id])
		}
	}
	if strings.Contains(logs.String(), "does not verify") {
		t.Errorf("a genuine attestation was warned about:\n%s", logs)
	}
	if n := strings.Count(logs.String(), "attested=true"); n != len(attested) {
		t.Errorf("%d cards logged attested, want %d", n, len(attested))
	}
	checkNoSecret(t, paths, stationFiles(t, batchPath), logs.String())
}

// crashAtLock is a station that dies right after its record was synced:
// LOCK never reaches the card.
type crashAtLock struct{ persotest.LocalCard }

func (c crashAtLock) Transmit(b []byte) ([]byte, error) {
	if len(b) > 1 && b[1] == protocol.INSLock {
		return nil, errCrash
	}
	return c.LocalCard.Transmit(b)
}

// recorder keeps the card's answers to one instruction.
type recorder struct {
	persotest.LocalCard
	ins     byte
	answers [][]byte
}

func (r *recorder) Transmit(b []byte) ([]byte, error) {
	resp, err := r.LocalCard.Transmit(b)
	if err == nil && len(b) > 1 && b[1] == r.ins {
		r.answers = append(r.answers, resp)
	}
	return resp, err
}

// The station dies between the journal's sync and LOCK for an attested
// card. The restarted station finds the card personalized, reads c and
// the signature back (READ ATTESTATION gives the signature the card
// persisted with c: the same one), finds the record already on file and
// locks the card: one record, with the first run's attestation, which
// verifies.
func TestAttestedCrashBeforeLock(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufactureAttested(t, dir, 0xA3, 1)
	batchPath := filepath.Join(dir, "batch.ndjson")
	j := openJournal(t, job, batchPath, nil)
	st := &perso.Station{Job: job, Ledger: j, Retries: 1}
	first := &recorder{LocalCard: crashAtLock{persotest.AppletCard(open(t, paths[0]))}, ins: protocol.INSReadAttestation}
	st.Run(context.Background(), persotest.LocalSlots{N: 1, Hopper: hopper(first)})
	j.Close() // no manifest: the process died
	if lc := open(t, paths[0]).LifeCycle(); lc != protocol.Personalized {
		t.Fatalf("card is %v after the crash, want personalized", lc)
	}
	lines := batchLines(t, batchPath)
	if len(lines) != 1 || !strings.Contains(lines[0], `"attestation"`) {
		t.Fatalf("journal before LOCK: %q", lines)
	}
	onFile, err := batch.ParseRecord([]byte(lines[0]))
	if err != nil {
		t.Fatal(err)
	}

	log, logs := newLog()
	j = openJournal(t, job, batchPath, log)
	st = &perso.Station{Job: job, Ledger: j, Log: log}
	again := &recorder{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: protocol.INSReadAttestation}
	runLocal(t, st, 1, hopper(again))
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	recs := checkFinal(t, batchPath, paths)
	if len(again.answers) != 1 {
		t.Fatalf("recovery read the attestation %d times, want once", len(again.answers))
	}
	if sig := again.answers[0][:len(again.answers[0])-2]; !bytes.Equal(sig, onFile.Attestation.Sig) || !bytes.Equal(first.answers[0], again.answers[0]) {
		t.Errorf("recovery read sig %x, the record holds %x", sig, []byte(onFile.Attestation.Sig))
	}
	if got := batchLines(t, batchPath); len(got) != 1 || got[0] != lines[0] {
		t.Errorf("batch after recovery:\n%q\nwant the first run's line alone", got)
	}
	verifyAttested(t, job, recs[0])
	for _, want := range []string{"outcome=recovered", "attested=true"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs.String(), "another attestation") {
		t.Errorf("recovery saw another attestation:\n%s", logs)
	}
}

// The station dies after every possible number of APDUs of an attested
// card (the chain needs GET RESPONSE), and restarts with the same batch:
// the card always ends locked with exactly one record, whose attestation
// verifies.
func TestAttestedCrashAtEveryAPDU(t *testing.T) {
	job := testJob(t)
	for n := 0; n <= 24; n++ {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			dir := t.TempDir()
			paths := manufactureAttested(t, dir, 0xA4, 1)
			batchPath := filepath.Join(dir, "batch.ndjson")
			j := openJournal(t, job, batchPath, nil)
			st := &perso.Station{Job: job, Ledger: j, Retries: 1}
			st.Run(context.Background(), persotest.LocalSlots{N: 1, Hopper: hopper(&crashing{LocalCard: persotest.AppletCard(open(t, paths[0])), n: n})})
			j.Close()
			if lc := open(t, paths[0]).LifeCycle(); n == 24 && lc != protocol.Locked {
				t.Fatalf("24 APDUs do not take an attested card to locked (%v): crash later too", lc)
			}
			j = openJournal(t, job, batchPath, nil)
			st = &perso.Station{Job: job, Ledger: j}
			runLocal(t, st, 1, hopper(persotest.AppletCard(open(t, paths[0]))))
			if _, err := perso.WriteManifest(j, "test"); err != nil {
				t.Fatal(err)
			}
			j.Close()
			recs := checkFinal(t, batchPath, paths)
			verifyAttested(t, job, recs[0])
		})
	}
}

// A card whose GET STATUS claims an attestation key, but whose chain or
// signature cannot be read (or is not of a record's shape), is set aside
// with an error saying so: not recorded, not locked.
func TestAttestationUnreadable(t *testing.T) {
	job := testJob(t)
	notFound := func([]byte) []byte { return []byte{0x6A, 0x88} }
	for _, tc := range []struct {
		name    string
		ins     byte
		rewrite func([]byte) []byte
		want    string
		after   protocol.LifeCycle // the card's state once set aside
	}{
		{"chain 6A88", protocol.INSGetAttestationChain, notFound, "GET ATTESTATION CHAIN: ", protocol.Blank},
		{"chain not DER", protocol.INSGetAttestationChain, func([]byte) []byte { return []byte{0x04, 0x01, 0x00, 0x90, 0x00} }, "not a DER SEQUENCE", protocol.Blank},
		{"sig 6A88", protocol.INSReadAttestation, notFound, "READ ATTESTATION: ", protocol.Personalized},
		{"sig too short", protocol.INSReadAttestation, func([]byte) []byte { return []byte{0x30, 0x01, 0x00, 0x90, 0x00} }, `attestation.sig\": 3 bytes, want 8 to 80`, protocol.Personalized},
		{"sig empty", protocol.INSReadAttestation, func([]byte) []byte { return []byte{0x90, 0x00} }, `attestation.sig\": 0 bytes, want 8 to 80`, protocol.Personalized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			paths := manufactureAttested(t, dir, 0xA5, 1)
			batchPath := filepath.Join(dir, "batch.ndjson")
			log, logs := newLog()
			j := openJournal(t, job, batchPath, log)
			st := &perso.Station{Job: job, Ledger: j, Log: log}
			fake := &fakeCard{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: tc.ins, rewrite: tc.rewrite}
			runLocal(t, st, 1, hopper(fake))
			j.Close()
			if j.Len() != 0 || st.Done() != 0 {
				t.Errorf("%d records, %d locked; want none", j.Len(), st.Done())
			}
			for _, want := range []string{"card set aside", "card claims an attestation key, but its attestation could not be read", tc.want} {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("log lacks %q:\n%s", want, logs)
				}
			}
			if lc := open(t, paths[0]).LifeCycle(); lc != tc.after {
				t.Errorf("card is %v, want %v", lc, tc.after)
			}
		})
	}
	// The error is ErrAttestation, through Job.Personalize.
	dir := t.TempDir()
	paths := manufactureAttested(t, dir, 0xA6, 1)
	j := openJournal(t, job, filepath.Join(dir, "batch.ndjson"), nil)
	defer j.Close()
	fake := &fakeCard{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: protocol.INSReadAttestation, rewrite: notFound}
	_, _, err := job.Personalize(&card.Client{T: fake}, "r", j)
	if !errors.Is(err, perso.ErrAttestation) || !errors.Is(err, iso7816.SW(0x6A88)) {
		t.Errorf("err = %v, want ErrAttestation wrapping 6A88", err)
	}
}

// A signature that does not verify (the card's certificate key does not
// sign it) is the issuer's to refuse: the station warns its operator,
// and records and locks the card as it gave it.
func TestAttestationBadSignatureWarned(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufactureAttested(t, dir, 0xA7, 1)
	batchPath := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batchPath, log)
	stats := perso.NewStats()
	st := &perso.Station{Job: job, Ledger: j, Log: log, Stats: stats}
	var given []byte
	fake := &fakeCard{LocalCard: persotest.AppletCard(open(t, paths[0])), ins: protocol.INSReadAttestation, rewrite: func(r []byte) []byte {
		r = bytes.Clone(r)
		r[len(r)-3] ^= 0x01 // the last byte of s: still DER, no longer the signature
		given = r[:len(r)-2]
		return r
	}}
	runLocal(t, st, 1, hopper(fake))
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	recs := checkFinal(t, batchPath, paths)
	if a := recs[0].Attestation; a == nil || !bytes.Equal(a.Sig, given) {
		t.Fatalf("record's attestation %+v, want the card's signature %x", a, given)
	}
	if err := perso.CheckAttestation(recs[0]); !errors.Is(err, perso.ErrAttestationInvalid) {
		t.Errorf("CheckAttestation = %v, want ErrAttestationInvalid", err)
	}
	if !strings.Contains(logs.String(), "attestation does not verify") || !strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("no warning:\n%s", logs)
	}
	var b bytes.Buffer
	stats.Render(&b, 0)
	if !strings.Contains(b.String(), "1 warnings") || !strings.Contains(b.String(), "warning: card") {
		t.Errorf("display:\n%s", b.String())
	}
}

// CheckAttestation's refusals, one each, on a genuine record altered.
func TestCheckAttestation(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufactureAttested(t, dir, 0xA8, 1)
	batchPath := filepath.Join(dir, "batch.ndjson")
	j := openJournal(t, job, batchPath, nil)
	runLocal(t, &perso.Station{Job: job, Ledger: j}, 1, hopper(persotest.AppletCard(open(t, paths[0]))))
	perso.WriteManifest(j, "test")
	j.Close()
	good := checkFinal(t, batchPath, paths)[0]
	if err := perso.CheckAttestation(good); err != nil {
		t.Fatal(err)
	}
	if err := perso.CheckAttestation(batch.Record{ID: []byte{1}}); err != nil {
		t.Errorf("unattested record: %v", err)
	}
	ca := testCA(t)
	other, err := ca.NewCard([]byte{0xEE}, chipca.CertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		edit func(r *batch.Record, a *batch.Attestation)
		want string
	}{
		{"other card's certificate", func(_ *batch.Record, a *batch.Attestation) { a.Chain = []protocol.Hex{other.Chain[0]} }, `serialNumber "ee"`},
		{"certificate garbage", func(_ *batch.Record, a *batch.Attestation) { a.Chain = []protocol.Hex{{0x30, 0}} }, "card certificate:"},
		{"other c", func(r *batch.Record, _ *batch.Attestation) { r.C = bytes.Clone(r.C); r.C[5] ^= 1 }, "SHA-256(c)"},
		{"other key", func(r *batch.Record, _ *batch.Attestation) { r.Fingerprint = make([]byte, 32) }, "signed fingerprint"},
		{"other profile", func(r *batch.Record, _ *batch.Attestation) { r.Profile = protocol.ECDHP256X963.Name }, "does not verify under"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good
			a := *good.Attestation
			r.Attestation = &a
			tc.edit(&r, &a)
			if err := perso.CheckAttestation(r); !errors.Is(err, perso.ErrAttestationInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// v1Line is a version 1 record of testJob, as the previous station wrote.
func v1Line(t testing.TB, job perso.Job, id string) string {
	fp := job.Key.Fingerprint()
	return `{"v":1,"id":"` + id + `","c":"04aa","profile":"` + job.Profile.Name + `","issuer_fingerprint":"` + hex.EncodeToString(fp[:]) + `","time":"2026-01-01T00:00:00Z"}` + "\n"
}

// A run on a version 1 batch is refused before any card, with a message
// saying what to do, and the batch is left as it was. Sealing it still
// works, and writes a version 1 manifest that matches it; the sealing
// journal takes no record.
func TestResumeVersion1Refused(t *testing.T) {
	job := testJob(t)
	path := filepath.Join(t.TempDir(), "old.ndjson")
	content := v1Line(t, job, "b101") + v1Line(t, job, "b102")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	fp := job.Key.Fingerprint()
	_, err := perso.OpenJournal(path, job.Profile.Name, fp[:], nil)
	if !errors.Is(err, perso.ErrOldBatch) {
		t.Fatalf("err = %v, want ErrOldBatch", err)
	}
	for _, want := range []string{"is a version 1 batch (blindperso-batch/1; line 1", "this station writes version 2", "does not append to an older batch",
		"Finish that batch with the station version that started it", "new --batch file", "perso seal --batch"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message lacks %q: %v", want, err)
		}
	}
	if b, _ := os.ReadFile(path); string(b) != content {
		t.Fatal("the refused batch was changed")
	}
	if _, err := os.Stat(batch.ManifestPath(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused start wrote a manifest: %v", err)
	}

	// Sealing: a version 1 manifest, and Verify reads the whole.
	j, err := perso.OpenJournal(path, "", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if j.Version() != batch.Version1 {
		t.Errorf("Version = %d", j.Version())
	}
	if err := j.Commit(rec(9, "c")); !errors.Is(err, perso.ErrOldBatch) {
		t.Errorf("Commit to a version 1 batch: %v, want ErrOldBatch", err)
	}
	m, err := perso.WriteManifest(j, "seal")
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
	if m.Format != batch.Format1 {
		t.Errorf("sealed manifest format %q, want %q", m.Format, batch.Format1)
	}
	vm, recs, err := readBatch(path)
	if err != nil || len(recs) != 2 || vm.Version() != 1 || recs[0].V != 1 {
		t.Fatalf("Verify of the sealed version 1 batch: %d records, %+v, %v", len(recs), vm, err)
	}
	// A new batch is version 2; an empty file is too (it holds no
	// record of another version).
	empty := filepath.Join(t.TempDir(), "empty.ndjson")
	os.WriteFile(empty, nil, 0o644)
	j = openJournal(t, job, empty, nil)
	if j.Version() != batch.Version2 {
		t.Errorf("empty batch: Version = %d", j.Version())
	}
	j.Close()
}

// A sealed batch of mixed versions is corrupt.
func TestSealMixedVersionsRefused(t *testing.T) {
	job := testJob(t)
	path := filepath.Join(t.TempDir(), "mixed.ndjson")
	v2 := strings.Replace(v1Line(t, job, "b102"), `"v":1`, `"v":2`, 1)
	if err := os.WriteFile(path, []byte(v1Line(t, job, "b101")+v2), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := perso.OpenJournal(path, "", nil, nil); err == nil || !strings.Contains(err.Error(), "line 2 is a version 2 record in a batch of version 1 records") {
		t.Fatalf("err = %v", err)
	}
}

// Attested cards through the two vpcd readers of a real pcscd: the chain
// (over 256 bytes) comes through GET RESPONSE, every record verifies.
func TestAttestedTwoReaders(t *testing.T) {
	needPCSC(t)
	job := testJob(t)
	dir := t.TempDir()
	attested := manufactureAttested(t, dir, 0xA9, 6)
	plain := manufacture(t, dir, 0xAA, 2)
	batchPath := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batchPath, log)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fed := feed(ctx, t, [][]string{append(attested[:3:3], plain[0]), append(attested[3:], plain[1])})
	st := &perso.Station{Job: job, Ledger: j, Log: log, Count: 8}
	if err := st.Run(ctx, pcscAll()); err != nil {
		t.Fatal(err)
	}
	for err := range fed {
		if err != nil {
			t.Error(err)
		}
	}
	if _, err := perso.WriteManifest(j, "test"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	recs := checkFinal(t, batchPath, append(append([]string(nil), attested...), plain...))
	n := 0
	for _, r := range recs {
		if r.Attestation != nil {
			verifyAttested(t, job, r)
			n++
		}
	}
	if n != len(attested) {
		t.Errorf("%d attested records, want %d:\n%s", n, len(attested), logs)
	}
}
