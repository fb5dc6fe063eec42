package perso_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"blindperso/batch"
	"blindperso/perso"
	"blindperso/perso/persotest"
	"blindperso/protocol"
)

func rec(id byte, c string) batch.Record {
	return batch.Record{ID: []byte{id}, C: []byte(c), Profile: "ecdh-p256-aes", Fingerprint: make([]byte, 32), Time: time.Unix(0, 0).UTC()}
}

// Opening a batch: what is repaired, what is refused, with which words.
func TestOpenJournal(t *testing.T) {
	fp := make([]byte, 32)
	good := func(t *testing.T, path string) {
		j, err := perso.OpenJournal(path, "ecdh-p256-aes", fp, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			if err := j.Commit(rec(byte(i), "c")); err != nil {
				t.Fatal(err)
			}
		}
		j.Close()
	}
	for _, tc := range []struct {
		name    string
		tail    string // appended after three good records
		profile string
		wantErr string
		wantLen int
	}{
		{"clean", "", "ecdh-p256-aes", "", 3},
		{"torn, no newline", `{"v":2,"id":"0`, "ecdh-p256-aes", "", 3},
		{"torn, garbage last line", "\x00\x00\x00\n", "ecdh-p256-aes", "", 3},
		{"corrupt middle line", "garbage\n" + `{"v":2,"id":"09","c":"63","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n", "ecdh-p256-aes", "line 4 is corrupt", 0},
		{"other profile", "", "rsa-oaep-aes", "holds records for profile ecdh-p256-aes", 0},
		{"repeated id", `{"v":2,"id":"01","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n", "ecdh-p256-aes", "repeats card 01", 0},
		{"torn, empty last line", "\n", "ecdh-p256-aes", "", 3},
		// A whole last line that is JSON but breaks a rule was not left by a
		// crash (it may be a locked card's record): refused, not cut.
		{"upper-case id on the last line", `{"v":2,"id":"0A","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n", "ecdh-p256-aes", `line 4 is corrupt (field "id": upper-case hex digit`, 0},
		{"offset time on the last line", `{"v":2,"id":"0a","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T02:00:00+02:00"}` + "\n", "ecdh-p256-aes", `line 4 is corrupt (field "time"`, 0},
		{"CRLF on the last line", `{"v":2,"id":"0a","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\r\n", "ecdh-p256-aes", "line 4 is corrupt (line ends in CR LF", 0},
		{"repeated member on the last line", `{"v":2,"v":2,"id":"0a","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n", "ecdh-p256-aes", `line 4 is corrupt (record repeats member "v"`, 0},
		{"future version", `{"v":3,"id":"07","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n" + "{}\n", "ecdh-p256-aes", "record version 3", 0},
		// A batch is of one version: a version 1 record among version 2
		// ones is corruption, even on the last line.
		{"version 1 record in a version 2 batch", `{"v":1,"id":"07","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n", "ecdh-p256-aes", "line 4 is a version 1 record in a batch of version 2 records", 0},
		{"attestation in a version 1 record", `{"v":1,"id":"07","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z","attestation":{}}` + "\n", "ecdh-p256-aes", `line 4 is corrupt (field "attestation": not in a version 1 record`, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "b.ndjson")
			good(t, path)
			appendBytes(t, path, tc.tail)
			j, err := perso.OpenJournal(path, tc.profile, fp, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer j.Close()
			if j.Len() != tc.wantLen {
				t.Errorf("Len = %d, want %d", j.Len(), tc.wantLen)
			}
			// Appending after a repair yields a well-formed batch.
			if err := j.Commit(rec(9, "c9")); err != nil {
				t.Fatal(err)
			}
			perso.WriteManifest(j, "t")
			if _, recs, err := readBatch(path); err != nil || len(recs) != tc.wantLen+1 {
				t.Fatalf("readBatch: %d records, %v", len(recs), err)
			}
		})
	}
}

// Same Id and c again is a no-op; another c is a flagged duplicate; a
// second station cannot open a batch in use.
func TestJournalCommitRules(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b.ndjson")
	j, err := perso.OpenJournal(path, "ecdh-p256-aes", make([]byte, 32), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if err := j.Commit(rec(1, "a")); err != nil {
		t.Fatal(err)
	}
	if err := j.Commit(rec(1, "a")); err != nil {
		t.Errorf("recommit of the same record: %v", err)
	}
	if err := j.Commit(rec(1, "b")); !errors.Is(err, perso.ErrDuplicateID) {
		t.Errorf("other c under a known Id: %v, want ErrDuplicateID", err)
	}
	if j.Len() != 1 {
		t.Errorf("Len = %d", j.Len())
	}
	if _, err := perso.OpenJournal(path, "ecdh-p256-aes", make([]byte, 32), nil); err == nil || !strings.Contains(err.Error(), "in use by another station") {
		t.Errorf("second open: %v", err)
	}
}

// mountTmpfs mounts a tmpfs of size bytes on a new dir (root only).
func mountTmpfs(t *testing.T, opts string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "perso-test", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// A full disk stops the station at the first record that does not fit:
// that card is left personalized (recoverable), every locked card has a
// whole record, and the batch holds no partial line.
func TestJournalDiskFull(t *testing.T) {
	job := testJob(t)
	fs := mountTmpfs(t, "size=4k")
	dir := t.TempDir()
	paths := manufacture(t, dir, 9, 40) // ~330 bytes a record: 4 KiB holds 12
	batch := filepath.Join(fs, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	var cards []persotest.LocalCard
	for _, p := range paths {
		cards = append(cards, persotest.AppletCard(open(t, p)))
	}
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	err := st.Run(t.Context(), persotest.LocalSlots{N: 1, Hopper: hopper(cards...)})
	if err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("Run = %v, want a no-space error", err)
	}
	j.Close()
	if !strings.Contains(logs.String(), "journal failed: stopping") {
		t.Errorf("log:\n%s", logs)
	}
	b, _ := os.ReadFile(batch)
	if len(b) == 0 || b[len(b)-1] != '\n' {
		t.Fatalf("batch does not end with a whole line (%d bytes)", len(b))
	}
	n := strings.Count(string(b), "\n")
	var locked, personalized int
	for _, p := range paths {
		switch open(t, p).LifeCycle() {
		case protocol.Locked:
			locked++
		case protocol.Personalized:
			personalized++
		}
	}
	if n == 0 || locked != n || personalized != 1 {
		t.Errorf("%d records, %d locked, %d personalized; want locked = records > 0 and one personalized", n, locked, personalized)
	}
}

// A read-only place for the batch refuses the start, before any card.
func TestJournalReadOnly(t *testing.T) {
	fs := mountTmpfs(t, "size=64k,ro")
	_, err := perso.OpenJournal(filepath.Join(fs, "batch.ndjson"), "ecdh-p256-aes", make([]byte, 32), nil)
	if err == nil || !strings.Contains(err.Error(), "read-only file system") {
		t.Fatalf("err = %v, want read-only", err)
	}
}

// A batch that starts with a UTF-8 BOM is refused, even when its one
// line is the last: a BOM is not what a torn append leaves.
func TestOpenJournalBOM(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b.ndjson")
	line := `{"v":2,"id":"01","c":"64","profile":"ecdh-p256-aes","issuer_fingerprint":"` + strings.Repeat("00", 32) + `","time":"1970-01-01T00:00:00Z"}` + "\n"
	if err := os.WriteFile(path, []byte("\uFEFF"+line), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := perso.OpenJournal(path, "ecdh-p256-aes", make([]byte, 32), nil)
	if err == nil || !strings.Contains(err.Error(), "line 1 is corrupt (starts with a UTF-8 byte order mark") {
		t.Fatalf("err = %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "\uFEFF"+line {
		t.Fatal("the batch was changed")
	}
}

// A failed fdatasync stops the station, and the records written since the
// last good sync are cut off: the kernel reports a writeback error once,
// so the next run's sync could not prove them durable, and their cards
// were not locked. The next run reads those cards back and records them
// again; every card ends locked with one record.
func TestJournalSyncFailure(t *testing.T) {
	job := testJob(t)
	dir := t.TempDir()
	paths := manufacture(t, dir, 0x5f, 3)
	batch := filepath.Join(dir, "batch.ndjson")
	log, logs := newLog()
	j := openJournal(t, job, batch, log)
	restore := perso.FailSyncs(1, syscall.EIO)
	st := &perso.Station{Job: job, Ledger: j, Log: log}
	var cards []persotest.LocalCard
	for _, p := range paths {
		cards = append(cards, persotest.AppletCard(open(t, p)))
	}
	err := st.Run(t.Context(), persotest.LocalSlots{N: 1, Hopper: hopper(cards...)})
	restore()
	if !errors.Is(err, perso.ErrJournalFailed) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("Run = %v, want a journal failure (EIO)", err)
	}
	j.Close()
	if !strings.Contains(logs.String(), "journal failed: stopping") {
		t.Errorf("log:\n%s", logs)
	}
	want := []protocol.LifeCycle{protocol.Locked, protocol.Personalized, protocol.Blank}
	for i, p := range paths {
		if lc := open(t, p).LifeCycle(); lc != want[i] {
			t.Errorf("card %d is %v, want %v", i, lc, want[i])
		}
	}
	if n := countLines(t, batch); n != 1 {
		t.Errorf("batch holds %d records after the failed sync, want 1 (the synced one)", n)
	}

	j = openJournal(t, job, batch, log)
	cards = nil
	for _, p := range paths {
		cards = append(cards, persotest.AppletCard(open(t, p)))
	}
	runLocal(t, &perso.Station{Job: job, Ledger: j, Log: log}, 1, hopper(cards...))
	if _, err := perso.WriteManifest(j, "t"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	checkFinal(t, batch, paths)
}
