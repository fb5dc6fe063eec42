package issuer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"

	"blindperso/attest"
	"blindperso/batch"
	"blindperso/hsm"
	"blindperso/protocol"
)

// DefaultMaxLine is the longest batch line the importer reads; a longer
// line is rejected (and skipped) without being held in memory.
const DefaultMaxLine = batch.DefaultMaxLine

// Importer streams station batches (docs/BATCH.md) into a Store through
// the Issuer's token, in constant memory:
//
//  1. The manifest is parsed (batch.ParseManifest, strict) and the whole
//     batch file is hashed in one streaming pass; a file whose name,
//     size, SHA-256 or line count differs from the manifest, or a
//     manifest for another issuer key, is refused before any record is
//     imported (the batch row says why).
//  2. A second streaming pass reads the records line by line
//     (batch.Scan: the one strict record parser), checks each against
//     its manifest and its chip attestation (Attest), and hands it to one
//     of Workers goroutines, chosen by a hash of the card Id,
//     so that records for one Id are handled in file order (the first c
//     in the file is the one kept, on every run). Each worker validates
//     the record, skips the token when the store already has the Id, has
//     the token derive and wrap K_I (Issuer.Import, one token session per
//     worker), and hands the result to one store writer, which commits
//     the results of many records (up to maxGroup, or what has arrived
//     within groupWait) in one transaction (group commit). A worker
//     asks the store about the Ids of all the records waiting in its
//     queue at once (one query for up to lookupBatch records).
//  3. The batch's counts are recomputed from the store's tables.
//
// A bad record becomes a reject row (line number and reason) and the
// import goes on. A store or token-session failure that is not about the
// record (the context is cancelled, the database is gone) stops the
// import; a rerun finishes it and gives the same store as a run that
// was never interrupted.
type Importer struct {
	Issuer  *Issuer
	Store   Store
	Workers int // token sessions used in parallel; at least 1
	MaxLine int // 0 means DefaultMaxLine
	// Attest checks each record's chip attestation under the issuer
	// key's policy (PROTOCOL.md §10.4) before any token work; nil is the
	// policy off. A refused attestation is the record's reject reason.
	Attest *attest.Checker
	// Log, if set, gets the token's own words when it refuses a c; the
	// reject reason stays ReasonTokenRefused (paper §4.5).
	Log *slog.Logger
	// TokenTime, if set, gets the duration of each record's token work
	// (Issuer.Import: derive, wrap, destroy), from the worker that did
	// it. A store's own timing cannot see it: the store is asked about
	// many Ids at once, and the writer commits many records at once.
	TokenTime func(time.Duration)

	// afterRecord, if set, runs after each record is handed to the store
	// writer (tests: it slows the import down).
	afterRecord func(line int)
	// groupWait, if set, replaces groupWait (tests).
	groupWait time.Duration
}

// ReasonTokenRefused is the one reject reason for every c the token
// cannot turn into a key, whatever the token said: a reason that told an
// OAEP padding failure from another refusal would make the issuer a
// decryption oracle (paper §4.5).
const ReasonTokenRefused = "token refused c"

// ImportFile imports the batch at path (with path.manifest.json beside
// it) and returns the batch's report.
func (im *Importer) ImportFile(ctx context.Context, path string) (BatchReport, error) {
	mraw, err := os.ReadFile(batch.ManifestPath(path))
	if err != nil {
		if _, serr := os.Stat(path); serr != nil {
			return BatchReport{}, fmt.Errorf("batch %s: %w", path, serr)
		}
		return BatchReport{}, fmt.Errorf("read manifest: %w", err)
	}
	// A manifest that does not parse (docs/BATCH.md) has no trustworthy
	// sha256 to name a batch row by: an error, nothing stored.
	m, err := batch.ParseManifest(mraw)
	if err != nil {
		return BatchReport{}, fmt.Errorf("manifest %s: %w", batch.ManifestPath(path), err)
	}
	id := hex.EncodeToString(m.SHA256)
	refuse := func(reason string) (BatchReport, error) {
		if err := im.Store.RefuseBatch(ctx, id, mraw, reason); err != nil {
			return BatchReport{}, err
		}
		return BatchReport{}, &BatchRefusedError{Path: path, Reason: reason}
	}
	if err := m.CheckName(path); err != nil {
		return refuse(err.Error())
	}
	if _, err := protocol.ProfileByName(m.Profile); err != nil {
		// Said once here, not as every record "differs from the manifest's".
		return refuse("the manifest names " + err.Error())
	}
	fp := im.Issuer.Key.Fingerprint()
	if !bytes.Equal(m.IssuerFingerprint, fp[:]) {
		return refuse(fmt.Sprintf("batch is for issuer key %x, not this issuer's %x", []byte(m.IssuerFingerprint), fp))
	}
	// Pass 1: the file is the one the manifest describes.
	f, err := os.Open(path)
	if err != nil {
		return BatchReport{}, err
	}
	sm, err := batch.Summarize(f)
	f.Close()
	if err != nil {
		return BatchReport{}, err
	}
	if err := m.Match(sm); err != nil {
		return refuse(err.Error())
	}
	sum := sm.SHA256
	if err := im.Store.BeginBatch(ctx, id, mraw, sm.Lines); err != nil {
		return BatchReport{}, err
	}
	// Pass 2: the records.
	sum2, err := im.stream(ctx, path, id, m)
	if err != nil {
		return BatchReport{}, err
	}
	if !bytes.Equal(sum2, sum) {
		return refuse("the batch file changed during the import (its SHA-256 differs between the check and the import)")
	}
	return im.Store.FinishBatch(ctx, id)
}

type job struct {
	line     int
	rec      batch.Record
	attested bool // its attestation verified (Importer.Attest)
	// known: the Id is stored or pending (no token work), as found by
	// the worker's lookup of the records queued with this one.
	known bool
}

// maxGroup is the most records the store writer commits in one
// transaction.
const maxGroup = 512

// groupWait is how long the store writer waits for more results before
// it commits a group that is not full. Every commit is one fsync of the
// store's log (SQLite WAL, synchronous=FULL; PostgreSQL's WAL flush):
// committing whatever has arrived, as soon as it has, meant a commit for
// every one or two records at token speed, and those fsyncs (and the
// SQL around them) slowed the token's own work by a third on a 2-vCPU
// machine (docs/BENCHMARKS.md, "Issuer import"). Waiting 50 ms commits
// 30 to 150 records at once. A kill loses at most the group in flight,
// which a rerun redoes, as before; the end of the batch commits at once.
const groupWait = 50 * time.Millisecond

// lookupBatch is the most records whose Ids a worker looks up in the
// store with one query.
const lookupBatch = 64

// queueLen is each worker's queue: records read ahead, so that a worker
// finds many waiting and looks their Ids up at once.
const queueLen = lookupBatch

// pending counts, per card Id, the cards handed to the store writer and
// not yet committed: a worker treats such an Id as stored (no token
// work), as it would once the writer has committed it, so group commit
// does not change which records reach the token.
type pending struct {
	mu sync.Mutex
	n  map[string]int
}

func (p *pending) add(id []byte) {
	p.mu.Lock()
	p.n[string(id)]++
	p.mu.Unlock()
}

func (p *pending) has(id []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n[string(id)] > 0
}

func (p *pending) done(rs []RecordResult) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range rs {
		if r.Card == nil {
			continue
		}
		k := string(r.Card.ID)
		if p.n[k]--; p.n[k] <= 0 {
			delete(p.n, k)
		}
	}
}

// stream reads the records and runs them through the workers; it returns
// the SHA-256 of what it read. The workers do the token work in
// parallel and hand their results to one store writer, which commits
// them in groups (whatever has arrived, up to maxGroup, per transaction).
// Records of one Id go through one worker and the one writer channel, so
// they are written in file order.
func (im *Importer) stream(ctx context.Context, path, batchID string, m batch.Manifest) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	n := max(im.Workers, 1)
	q := &resultQueue{c: make(chan RecordResult, 2*maxGroup), full: make(chan struct{}, 1), end: make(chan struct{})}
	pend := &pending{n: map[string]int{}}
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		im.write(ctx, q, pend, cancel)
	}()
	// send hands a result to the writer; false if the import is stopping.
	send := func(r RecordResult) bool {
		if r.Card != nil {
			pend.add(r.Card.ID)
		}
		select {
		case q.c <- r:
		case <-ctx.Done():
			return false
		}
		if len(q.c) >= maxGroup {
			select {
			case q.full <- struct{}{}:
			default:
			}
		}
		if im.afterRecord != nil {
			im.afterRecord(r.Line)
		}
		return true
	}
	queues := make([]chan job, n)
	var wg sync.WaitGroup
	for i := range queues {
		queues[i] = make(chan job, queueLen)
		wg.Add(1)
		go func(q chan job) {
			defer wg.Done()
			// One OS thread for all of this worker's token calls: the
			// library's per-thread state (its malloc arena, OpenSSL's
			// caches) and the CPU's caches stay warm. Measured: the
			// import at one worker ≈ 10 % faster.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			jobs := make([]job, 0, lookupBatch)
			sent := make([][]byte, 0, lookupBatch)
			for j := range q {
				if ctx.Err() != nil {
					continue // drain
				}
				// Take what else is waiting, and ask the store about
				// all their Ids at once.
				jobs = append(jobs[:0], j)
			more:
				for len(jobs) < lookupBatch {
					select {
					case j, ok := <-q:
						if !ok {
							break more
						}
						jobs = append(jobs, j)
					default:
						break more
					}
				}
				if err := im.lookup(ctx, jobs, pend); err != nil {
					cancel(err)
					continue
				}
				// An Id that an earlier job of this list handed to the
				// writer is known too: it may be committed and gone from
				// pending by now, after the store was asked.
				sent = sent[:0]
				for _, j := range jobs {
					if ctx.Err() != nil {
						break
					}
					for k := 0; k < len(sent) && !j.known; k++ {
						j.known = bytes.Equal(sent[k], j.rec.ID)
					}
					r, err := im.card(ctx, batchID, j)
					if err != nil {
						cancel(err)
						break
					}
					if send(r) && r.Card != nil {
						sent = append(sent, j.rec.ID)
					}
				}
			}
		}(queues[i])
	}
	h := sha256.New()
	rerr := batch.Scan(io.TeeReader(f, h), im.MaxLine, func(line int, rec batch.Record, err error) error {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		if err != nil {
			send(RecordResult{Batch: batchID, Line: line, Reason: err.Error()})
			return nil
		}
		// A record of an unknown profile, or of another version,
		// profile or key than its manifest's, is rejected before its
		// attestation is looked at.
		if _, err := protocol.ProfileByName(rec.Profile); err != nil {
			send(RecordResult{Batch: batchID, Line: line, Reason: fmt.Sprintf("unknown profile %q", rec.Profile)})
			return nil
		}
		if err := m.CheckRecord(rec); err != nil {
			send(RecordResult{Batch: batchID, Line: line, Reason: err.Error()})
			return nil
		}
		// The attestation is checked here, on the host, while the
		// workers' token calls run: public data only, before the token
		// sees c (PROTOCOL.md §10.4).
		attested, err := im.Attest.Check(rec)
		var ae *attest.Error
		switch {
		case errors.As(err, &ae):
			send(RecordResult{Batch: batchID, Line: line, Reason: err.Error()})
			return nil
		case err != nil:
			return err
		}
		hh := fnv.New32a()
		hh.Write(rec.ID)
		select {
		case queues[int(hh.Sum32()%uint32(n))] <- job{line: line, rec: rec, attested: attested}:
		case <-ctx.Done():
		}
		return nil
	})
	for _, q := range queues {
		close(q)
	}
	wg.Wait()
	close(q.end)
	close(q.c)
	<-wdone
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return nil, err
	}
	if rerr != nil {
		return nil, rerr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// lookup sets known on each of jobs whose Id is pending (handed to the
// writer, not yet committed) or stored: such a record needs no token
// work. Pending is asked first and the store after, so that an Id the
// writer commits (and then clears from pending) between the two is
// still seen. A store without KnownCards is asked per record.
func (im *Importer) lookup(ctx context.Context, jobs []job, pend *pending) error {
	var ask [][]byte
	var at []int
	for i := range jobs {
		id := jobs[i].rec.ID
		jobs[i].known = pend.has(id)
		if !jobs[i].known {
			ask = append(ask, id)
			at = append(at, i)
		}
	}
	if len(ask) == 0 {
		return nil
	}
	if lc, ok := im.Store.(cardLookup); ok {
		found, err := lc.KnownCards(ctx, ask)
		if err != nil {
			return err
		}
		for k, i := range at {
			jobs[i].known = found[k]
		}
		return nil
	}
	for _, i := range at {
		_, found, err := im.Store.CardCHash(ctx, jobs[i].rec.ID)
		if err != nil {
			return err
		}
		jobs[i].known = found
	}
	return nil
}

// cardLookup is a store that can tell which of many card Ids it holds in
// one query (sqlStore.KnownCards).
type cardLookup interface {
	KnownCards(ctx context.Context, ids [][]byte) ([]bool, error)
}

// resultQueue hands the results of the workers (and the reader's rejects)
// to the store writer, which sleeps while a group fills: it is woken once
// per group — groupWait after the group's first result, or when maxGroup
// results wait, or at the end of the input — not once per record, which
// (a futex wake-up of the writer per card) cost ≈ 20 µs of a card's
// time at one worker.
type resultQueue struct {
	c    chan RecordResult // 2 × maxGroup
	full chan struct{}     // capacity 1: a group's worth is waiting
	end  chan struct{}     // closed after the last result
}

// write is the store writer: it takes a result, lets more arrive for
// groupWait (up to maxGroup) and commits them in one transaction. A
// failed group stops the import at once (stop; a rerun redoes the group:
// the writes are idempotent); the rest of q is drained.
func (im *Importer) write(ctx context.Context, q *resultQueue, pend *pending, stop func(error)) {
	group := make([]RecordResult, 0, maxGroup)
	wait := im.groupWait
	if wait <= 0 {
		wait = groupWait
	}
	timer := time.NewTimer(wait)
	timer.Stop()
	for r := range q.c {
		if ctx.Err() != nil {
			continue // drain
		}
		group = append(group[:0], r)
		select {
		case <-q.full: // left from the group before
		default:
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-q.full:
		case <-q.end:
		case <-ctx.Done():
		}
		timer.Stop()
	take:
		for len(group) < maxGroup {
			select {
			case r, ok := <-q.c:
				if !ok {
					break take
				}
				group = append(group, r)
			default:
				break take
			}
		}
		if ctx.Err() != nil {
			continue
		}
		if _, err := im.Store.PutResults(ctx, group); err != nil {
			stop(err)
			continue
		}
		pend.done(group)
	}
}

// card handles one parsed record: its result is a reject or a card (new,
// or found already stored or pending: then without a wrapped key, and
// PutResults decides duplicate or conflict). Its error is not about the
// record: it stops the import.
func (im *Importer) card(ctx context.Context, batchID string, j job) (RecordResult, error) {
	rec := j.rec
	res := RecordResult{Batch: batchID, Line: j.line}
	reject := func(reason string) (RecordResult, error) {
		res.Reason = reason
		return res, nil
	}
	// The record matches its manifest (stream: Manifest.CheckRecord),
	// whose profile is known and whose key is this issuer's (ImportFile).
	fp := im.Issuer.Key.Fingerprint()
	p, err := protocol.ProfileByName(rec.Profile)
	if err != nil {
		return res, err
	}
	if err := protocol.ValidCiphertext(p, im.Issuer.Key.Public, rec.C); err != nil {
		return reject("bad c: " + err.Error())
	}
	ch := sha256.Sum256(rec.C)
	// A card already stored, or handed to the writer and not yet
	// committed (lookup), needs no token work: the same c is a
	// duplicate, another c a conflict; the store decides which.
	var ck CardKey
	if j.known {
		ck = CardKey{ID: rec.ID, Profile: p.Name, IssuerFingerprint: fp[:]}
	} else {
		start := time.Now()
		ck, err = im.Issuer.Import(ctx, rec)
		if im.TokenTime != nil {
			im.TokenTime(time.Since(start))
		}
		if err != nil {
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			if hsm.Unavailable(err) {
				// The token failed, not the record (every member of a
				// group, if there are several): stop; a rerun imports
				// this record and those after it.
				return res, fmt.Errorf("line %d: %w (nothing of this record was written; run the import again when the token is back)", j.line, err)
			}
			if im.Log != nil {
				im.Log.Warn("token refused c", "batch", batchID, "line", j.line, "card", fmt.Sprintf("%x", []byte(rec.ID)), "err", err)
			}
			return reject(ReasonTokenRefused)
		}
	}
	res.Card = &StoredCard{
		CardKey: ck, IssuerKeyLabel: im.Issuer.Key.Label, CSHA256: ch[:], Batch: batchID, Line: j.line,
		Attested: j.attested,
	}
	return res, nil
}
