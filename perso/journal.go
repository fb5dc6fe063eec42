package perso

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"blindperso/batch"
	"blindperso/internal/atomicfile"
)

// ErrDuplicateID reports a second card claiming the Id of a card already in
// the batch with another c. The first record stands; the second card is
// left unlocked and listed in the rejects file.
var ErrDuplicateID = errors.New("duplicate card Id")

// ErrOldBatch: the batch holds version 1 records (docs/BATCH.md,
// "Versioning"). This station writes version 2 and does not append to
// it: a batch is one version throughout, its manifest's.
var ErrOldBatch = errors.New("batch is of an older format version")

// oldBatchError is ErrOldBatch with the whole story, in the operator's
// words.
type oldBatchError struct{ msg string }

func (e *oldBatchError) Error() string        { return e.msg }
func (e *oldBatchError) Is(target error) bool { return target == ErrOldBatch }

// ErrJournalFailed means a write or sync of the journal failed: from then
// on nothing is known durable, so no card may be locked. The station stops.
var ErrJournalFailed = errors.New("journal failed")

// Journal is the batch file, written as the station's write-ahead journal:
// one NDJSON record per card, appended and fsynced before the card is
// locked. Because a record is durable before LOCK, and a card stays
// readable (READ CIPHERTEXT) until LOCK, a crash at any instant leaves each
// card blank, personalized with c recoverable, or locked with its record on
// disk. The journal file itself is what the issuer imports, with the
// manifest beside it (WriteManifest).
//
// A Journal holds an exclusive flock on the batch file, so two stations
// cannot append to one batch; the kernel drops it when the process dies.
type Journal struct {
	path    string
	profile string
	fp      []byte
	version int // the records' version: batch.Version unless a sealed older batch
	log     *slog.Logger

	mu     sync.Mutex
	f      *os.File
	size   int64            // bytes written (page cache)
	index  map[string]entry // hex Id → entry
	order  int              // records in the batch
	sum    hash.Hash        // SHA-256 of the first size bytes
	failed error

	syncMu sync.Mutex
	synced int64 // bytes a sync of this process covered, and so durable

	rejects *os.File
}

type entry struct {
	c   []byte
	att []byte // SHA-256 of the record's attestation (JSON), nil without one
	end int64  // offset just past the record's line
}

// attDigest is what the journal keeps of an attestation to tell, when a
// card is read back, whether it gave the same one: its SHA-256, not the
// chain itself (a kilobyte and more a card).
func attDigest(a *batch.Attestation) []byte {
	if a == nil {
		return nil
	}
	b, err := json.Marshal(a)
	if err != nil {
		return nil
	}
	h := sha256.Sum256(b)
	return h[:]
}

// OpenJournal opens (creating if needed) the batch at path for records of
// profile under the issuer key with fingerprint fp. It repairs a torn last
// line (a crash in the middle of an append: that record was never synced,
// so its card was never locked and will be read back) and refuses a batch
// with a corrupt line elsewhere or records of another profile or key.
// Before it returns, everything it read is made durable by this process
// (makeDurable): the batch, the rejects file and their directory, so
// that a record an earlier run wrote but never synced is synced before
// any card is locked on it.
// Empty profile and nil fp take them from the first record (for sealing a
// batch without knowing its job).
//
// Versions (docs/BATCH.md, "Versioning"): a run (profile and fp given)
// appends only to a batch of batch.Version, the one it writes: a batch of
// version 1 records is refused with ErrOldBatch, to be finished by the
// station that started it or sealed as it is. Sealing (empty profile, nil
// fp) takes any version this station reads, and WriteManifest writes that
// version's format; such a journal takes no new record. A batch whose
// records are not all of one version is corrupt.
func OpenJournal(path, profile string, fp []byte, log *slog.Logger) (*Journal, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	_, statErr := os.Stat(path)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open batch: %w", err)
	}
	created := errors.Is(statErr, os.ErrNotExist)
	fail := func(err error) (*Journal, error) {
		f.Close()
		if created {
			os.Remove(path)
		}
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return fail(fmt.Errorf("batch %s is in use by another station (flock: %v)", path, err))
	}
	j := &Journal{path: path, profile: profile, fp: fp, log: log, f: f,
		index: map[string]entry{}, sum: sha256.New()}
	sealing := profile == "" && fp == nil
	if err := j.load(sealing); err != nil {
		return fail(err)
	}
	if j.version == 0 { // no record: the batch is written in this version
		j.version = batch.Version
	}
	if _, err := f.Seek(j.size, io.SeekStart); err != nil {
		return fail(err)
	}
	testHooks.event(TraceOpen, path, j.size)
	if err := j.makeDurable(); err != nil {
		if j.rejects != nil {
			j.rejects.Close()
		}
		return fail(fmt.Errorf("batch %s: make what it holds durable before relying on it: %w", path, err))
	}
	j.synced = j.size // true now, not merely read back
	return j, nil
}

// makeDurable makes durable, in this process, everything the journal
// read and will rely on: a record an earlier run wrote and was killed
// before its fdatasync returned is in the page cache only, and that run
// never locked its card; this run would, on the strength of reading the
// record back (Commit of the same Id and c returns once synced reaches
// the record). So: fsync the batch (everything load read), fsync the
// rejects file if there is one (the manifest counts its lines), and fsync
// the directory, on every open: the batch's entry (a run that created
// it may have died before its directory sync) and the rejects and torn
// side files'. docs/STATION.md, "What is durable, and since when".
func (j *Journal) makeDurable() error {
	if err := syncFull(j.f, j.path, j.size); err != nil {
		return err
	}
	rp := batch.RejectsPath(j.path)
	if r, err := os.OpenFile(rp, os.O_WRONLY|os.O_APPEND, 0); err == nil {
		j.rejects = r
		if err := syncFull(r, rp, -1); err != nil {
			return fmt.Errorf("%s: %w", rp, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(filepath.Dir(j.path))
}

// load reads every record, checks it and indexes it. Unless sealing,
// the batch must be of batch.Version.
func (j *Journal) load(sealing bool) error {
	r := bufio.NewReaderSize(j.f, 64<<10)
	var off int64
	for n := 1; ; n++ {
		line, err := r.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			j.size = off
			if len(line) > 0 {
				return j.repairTail(off, line, "no newline: the station stopped in the middle of an append")
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("read batch %s: %w", j.path, err)
		}
		rec, perr := batch.ParseRecord(line[:len(line)-1])
		if perr != nil {
			// Only a last line that is empty or not JSON at all is what a
			// torn append leaves; a whole JSON line that breaks a rule
			// was written by something, and may be a locked card's record.
			if _, err := r.Peek(1); errors.Is(err, io.EOF) && batch.Torn(perr) {
				j.size = off
				return j.repairTail(off, line, perr.Error())
			}
			return fmt.Errorf("batch %s line %d is corrupt (%v): not a torn last line, so refusing to guess; move the file aside", j.path, n, perr)
		}
		if j.version == 0 {
			j.version = rec.V
			if rec.V != batch.Version && !sealing {
				f := batch.FormatOf(rec.V)
				return &oldBatchError{fmt.Sprintf("batch %s is a version %d batch (%s; line %d is a version %d record), and this station writes version %d (%s): it does not append to an older batch. Finish that batch with the station version that started it, or give this run a new --batch file (perso seal --batch %s writes the old batch's %s manifest for the issuer)",
					j.path, rec.V, f, n, rec.V, batch.Version, batch.Format, j.path, f)}
			}
		}
		if rec.V != j.version {
			return fmt.Errorf("batch %s line %d is a version %d record in a batch of version %d records (line 1): a batch is of one version; refusing it", j.path, n, rec.V, j.version)
		}
		if sealing && j.profile == "" && j.fp == nil { // OpenJournal for sealing: learn them
			j.profile, j.fp = rec.Profile, rec.Fingerprint
		}
		if rec.Profile != j.profile || !bytes.Equal(rec.Fingerprint, j.fp) {
			return fmt.Errorf("batch %s holds records for profile %s under issuer key %x (line %d); this run is %s under %x: use another --batch",
				j.path, rec.Profile, []byte(rec.Fingerprint), n, j.profile, j.fp)
		}
		id := hex.EncodeToString(rec.ID)
		if _, dup := j.index[id]; dup {
			return fmt.Errorf("batch %s line %d repeats card %s: the file was edited; refusing it", j.path, n, id)
		}
		off += int64(len(line))
		j.index[id] = entry{c: rec.C, att: attDigest(rec.Attestation), end: off}
		j.sum.Write(line)
		j.order++
	}
}

// repairTail cuts a torn last line off the batch, keeping its bytes in a
// side file for the record. Its record was never acknowledged (the sync
// did not return), so no card was locked on its strength.
func (j *Journal) repairTail(off int64, torn []byte, why string) error {
	side := fmt.Sprintf("%s.torn-%s", j.path, time.Now().UTC().Format("20060102T150405.000000000"))
	// The side file, and its directory entry, are durable before the
	// bytes are cut from the batch: a power loss never loses both.
	if err := writeDurable(side, torn); err != nil {
		return fmt.Errorf("batch %s: keep torn last line: %w", j.path, err)
	}
	if err := syncDir(filepath.Dir(j.path)); err != nil {
		return fmt.Errorf("batch %s: keep torn last line: %w", j.path, err)
	}
	if err := j.f.Truncate(off); err != nil {
		return fmt.Errorf("batch %s: cut torn last line: %w", j.path, err)
	}
	if err := syncFull(j.f, j.path, off); err != nil {
		return fmt.Errorf("batch %s: %w", j.path, err)
	}
	j.size = off
	j.log.Warn("batch had a torn last line; removed it (its card is unlocked and will be read back)",
		"batch", j.path, "bytes", len(torn), "reason", why, "kept_in", side)
	return nil
}

// Lookup returns the c recorded for card id, if any.
func (j *Journal) Lookup(id []byte) ([]byte, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	e, ok := j.index[hex.EncodeToString(id)]
	return e.c, ok
}

// Len is the number of records in the batch.
func (j *Journal) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.order
}

// Commit appends rec and returns once it is on disk. A record whose Id is
// already in the batch with the same c is durable already (a card read
// back after a crash): Commit waits for it to be synced and returns nil;
// the record on file stands (if the card now gives another attestation,
// which a card that persists its signature with c does not, that is
// logged). Another c under a known Id is ErrDuplicateID: it is written to
// the rejects file, never over the first record. A journal opened to
// seal a batch of an older version takes no record (ErrOldBatch).
//
// Concurrent commits share fsyncs: a sync covers every line written
// before it started (group commit), so many readers cost few syncs.
func (j *Journal) Commit(rec batch.Record) error {
	id := hex.EncodeToString(rec.ID)
	line, err := batch.MarshalRecord(rec)
	if err != nil {
		return err
	}

	j.mu.Lock()
	if j.failed != nil {
		j.mu.Unlock()
		return j.failed
	}
	if j.version != batch.Version {
		j.mu.Unlock()
		return &oldBatchError{fmt.Sprintf("batch %s holds version %d records, opened to be sealed: this station appends only version %d records, to a version %d batch", j.path, j.version, batch.Version, batch.Version)}
	}
	if e, ok := j.index[id]; ok {
		j.mu.Unlock()
		if bytes.Equal(e.c, rec.C) {
			if att := attDigest(rec.Attestation); !bytes.Equal(att, e.att) {
				j.log.Warn("card read back gave another attestation than its record's; the record on file stands",
					"card", id, "batch", j.path, "attested_now", rec.Attestation != nil, "attested_on_file", e.att != nil)
			}
			return j.syncTo(e.end)
		}
		return j.reject(rec, line)
	}
	n, err := j.f.Write(line)
	if err != nil {
		// Take a partial line back out, so the batch never holds half a
		// record that a later append would glue garbage to.
		if n > 0 {
			if terr := j.f.Truncate(j.size); terr != nil {
				err = fmt.Errorf("%w (and cutting the partial line failed: %v)", err, terr)
				j.failed = fmt.Errorf("%w: %w", ErrJournalFailed, err)
			} else if _, serr := j.f.Seek(j.size, io.SeekStart); serr != nil {
				j.failed = fmt.Errorf("%w: %w", ErrJournalFailed, serr)
			}
		}
		if j.failed == nil {
			j.failed = fmt.Errorf("%w: write %s: %w", ErrJournalFailed, j.path, err)
		}
		j.mu.Unlock()
		return j.failed
	}
	j.size += int64(n)
	end := j.size
	j.index[id] = entry{c: rec.C, att: attDigest(rec.Attestation), end: end}
	j.sum.Write(line)
	j.order++
	j.mu.Unlock()
	return j.syncTo(end)
}

// syncTo returns once the first end bytes are durable.
func (j *Journal) syncTo(end int64) error {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	if j.synced >= end {
		return nil
	}
	j.mu.Lock()
	target, failed := j.size, j.failed
	j.mu.Unlock()
	if failed != nil {
		return failed
	}
	if err := syncData(j.f, j.path, target); err != nil {
		// After a failed fsync the kernel may have dropped the dirty
		// pages, or kept them marked clean, and reports the error once:
		// a later fsync, this run's or the next one's, returns nil
		// without those bytes on disk. So nothing written since the last
		// good sync can be trusted, and it is cut off, lest the next run
		// read a record back and lock its card on a sync that proves
		// nothing. No card was locked on it (its commit fails here); the
		// next run reads its c back and appends it again.
		j.mu.Lock()
		j.failed = fmt.Errorf("%w: sync %s: %w", ErrJournalFailed, j.path, err)
		if terr := j.f.Truncate(j.synced); terr != nil {
			j.failed = fmt.Errorf("%w (and cutting the unsynced records off failed: %v)", j.failed, terr)
		}
		j.mu.Unlock()
		return j.failed
	}
	j.synced = target
	return nil
}

// reject writes a duplicate-Id record to the rejects file (synced) and
// returns ErrDuplicateID.
func (j *Journal) reject(rec batch.Record, line []byte) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	dupErr := fmt.Errorf("%w: card %x is already in the batch with another c; kept the first record, this card stays unlocked: set it aside", ErrDuplicateID, []byte(rec.ID))
	created := false
	if j.rejects == nil { // OpenJournal opened it if it existed
		f, err := os.OpenFile(batch.RejectsPath(j.path), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("%w (and recording it failed: %v)", dupErr, err)
		}
		j.rejects, created = f, true
	}
	if _, err := j.rejects.Write(line); err != nil {
		return fmt.Errorf("%w (and recording it failed: %v)", dupErr, err)
	}
	if err := syncFull(j.rejects, j.rejects.Name(), -1); err != nil {
		return fmt.Errorf("%w (and recording it failed: %v)", dupErr, err)
	}
	if created {
		if err := syncDir(filepath.Dir(j.path)); err != nil {
			return fmt.Errorf("%w (and recording it failed: %v)", dupErr, err)
		}
	}
	return dupErr
}

// Summary is the batch as the manifest describes it.
func (j *Journal) Summary() (count int, size int64, sum []byte, err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.failed != nil {
		return 0, 0, nil, j.failed
	}
	return j.order, j.size, j.sum.Sum(nil), nil
}

// Version is the version of the batch's records: batch.Version, or an
// older one for a batch opened to be sealed.
func (j *Journal) Version() int { return j.version }

// Path is the batch file.
func (j *Journal) Path() string { return j.path }

// Close syncs and closes the batch (releasing its lock).
func (j *Journal) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	var errs []error
	if j.rejects != nil {
		errs = append(errs, j.rejects.Close())
	}
	if j.failed == nil {
		errs = append(errs, syncFull(j.f, j.path, j.size))
	}
	errs = append(errs, j.f.Close())
	return errors.Join(errs...)
}

func syncDir(dir string) error {
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	testHooks.event(TraceDirSync, dir, 0)
	return nil
}

// writeDurable creates path (which must not exist) holding data, synced.
func writeDurable(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = syncFull(f, path, int64(len(data)))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncFull fsyncs f (named path, n bytes long); syncData fdatasyncs it.
// Both are traced in a test build (testhook.go), and a test build may
// slow fdatasync down.
func syncFull(f *os.File, path string, n int64) error {
	testHooks.event(TraceFsyncBegin, path, n)
	if err := f.Sync(); err != nil {
		return err
	}
	testHooks.event(TraceFsync, path, n)
	return nil
}

func syncData(f *os.File, path string, n int64) error {
	testHooks.event(TraceFdatasyncBegin, path, n)
	if err := testHooks.slowDisk(); err != nil {
		return err
	}
	if err := fdatasync(f); err != nil {
		return err
	}
	testHooks.event(TraceFdatasync, path, n)
	return nil
}
