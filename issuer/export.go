package issuer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
)

// Export of card keys to a receiving system (docs/EXPORT.md): the
// cards of a selection, in Id order, each K_I moved inside the token
// from the KEK to the receiver's key-transport key (hsm.ExportCardKey:
// unwrap under the KEK into a key that can do nothing, wrap under the
// KTK with RFC 3394, destroy), and written as one line of an export
// file (package export) with its manifest.
//
// Like KEK rotation (rotate.go) it streams: a reader takes the cards
// from the store in pages, Workers token sessions export chunks of
// them, and one writer puts the results in Id order into the file.
// Resumable and crash-safe: the lines go to OUT.partial, synced every
// group, and only then are the group's cards logged in the store (so the
// store's log is never ahead of the synced file). A rerun with the same
// arguments re-reads the partial file (cutting off a torn last line),
// logs the cards of complete lines the store missed, forgets those it
// logged past the file's end, and continues after the last line's Id.
// RFC 3394 is deterministic, so the finished file is byte for byte the
// one an uninterrupted run writes.

// ExportSelection is the cards an export takes: those of one batch, those
// in one state, or those of a list of Ids (ReadIDList); exactly one.
type ExportSelection struct {
	Batch string
	State string
	// IDs are sorted and distinct, all stored (Exporter checks before
	// any token work).
	IDs [][]byte
	// IDsFrom names the list (its file's name) and IDsSHA256 is the
	// SHA-256 of its content, for the selection's words.
	IDsFrom   string
	IDsSHA256 []byte
}

// String is the selection in words, as the manifest and the store's log
// have it.
func (s ExportSelection) String() string {
	switch {
	case s.Batch != "":
		return "batch " + s.Batch
	case s.State != "":
		return "state " + s.State
	case s.IDs != nil:
		return fmt.Sprintf("ids from %s (%d cards, SHA-256 %x)", s.IDsFrom, len(s.IDs), s.IDsSHA256)
	}
	return "nothing"
}

func (s ExportSelection) check() error {
	n := 0
	for _, set := range []bool{s.Batch != "", s.State != "", s.IDs != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return errors.New("export: select the cards with exactly one of a batch (--batch ID), an Id list (--ids FILE) or a state (--state active|blocked|conflict)")
	}
	switch s.State {
	case "", StateActive, StateBlocked, StateConflict:
	default:
		return fmt.Errorf("export: state %q: want %s, %s or %s", s.State, StateActive, StateBlocked, StateConflict)
	}
	for i := 1; i < len(s.IDs); i++ {
		if bytes.Compare(s.IDs[i-1], s.IDs[i]) >= 0 {
			return errors.New("export: the Id list is not sorted and distinct (use ReadIDList)")
		}
	}
	return nil
}

// ReadIDList reads an Id list for an export: one card Id in hex per line;
// blank lines, and everything from a '#' to the end of its line, are
// ignored. An Id that is not hex, or listed twice, is an error naming
// its line. The Ids come back sorted.
func ReadIDList(path string) (ExportSelection, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ExportSelection{}, fmt.Errorf("Id list: %w", err)
	}
	sum := sha256.Sum256(b)
	sel := ExportSelection{IDs: [][]byte{}, IDsFrom: filepath.Base(path), IDsSHA256: sum[:]}
	at := map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		l := sc.Text()
		if i := strings.IndexByte(l, '#'); i >= 0 {
			l = l[:i]
		}
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		id, err := hex.DecodeString(l)
		if err != nil || len(id) == 0 || len(id) > protocol.MaxIDLen {
			return ExportSelection{}, fmt.Errorf("Id list %s line %d: %q is not a card Id (hex, 1 to %d bytes)", path, line, l, protocol.MaxIDLen)
		}
		if prev, ok := at[string(id)]; ok {
			return ExportSelection{}, fmt.Errorf("Id list %s line %d: card %x is listed twice (also line %d)", path, line, id, prev)
		}
		at[string(id)] = line
		sel.IDs = append(sel.IDs, id)
	}
	if err := sc.Err(); err != nil {
		return ExportSelection{}, fmt.Errorf("Id list %s line %d: %w", path, line+1, err)
	}
	sort.Slice(sel.IDs, func(i, j int) bool { return bytes.Compare(sel.IDs[i], sel.IDs[j]) < 0 })
	return sel, nil
}

// FindKTK finds the KTK labelled label in tok, and says what to do when
// it is not there or is not a KTK.
func FindKTK(ctx context.Context, tok *hsm.Token, label string) (*hsm.KTKRef, error) {
	if label == "" {
		return nil, errors.New("export: no KTK label (--ktk): name the receiver's key-transport key, as the key ceremony imported it")
	}
	k, err := tok.FindKTK(ctx, label)
	switch {
	case err == nil:
		return k, nil
	case errors.Is(err, hsm.ErrNotKTK):
		return nil, fmt.Errorf("%w: --ktk names the receiver's key-transport key, not a KEK (the key the store's blobs are under is --kek)", err)
	case errors.Is(err, hsm.ErrNoKTK):
		return nil, fmt.Errorf("%w: a KTK comes only from the receiving system, imported under the key-import key by the key ceremony with the security officer; check the label in the ceremony's transcript", err)
	}
	return nil, err
}

// ExportProgress is where an export stands.
type ExportProgress struct {
	// Total is the number of cards the selection held when the run
	// began; Done the lines in the file (Resumed of them from earlier
	// runs).
	Total, Done, Resumed int
	Elapsed              time.Duration
}

// ExportResult is what an export did.
type ExportResult struct {
	// ID is the export's row in the store (ExportLog).
	ID       string          `json:"id"`
	File     string          `json:"file"`
	Manifest export.Manifest `json:"manifest"`
	// Resumed is the number of cards an earlier, interrupted run had
	// written, Written those this run wrote.
	Resumed int `json:"resumed"`
	// TornBytes is the length of the torn last line of the interrupted
	// run's partial file, cut off.
	TornBytes int64   `json:"torn_bytes,omitempty"`
	Written   int     `json:"written"`
	Seconds   float64 `json:"seconds"`
}

const (
	// exportPage is how many cards the reader takes from the store per
	// query.
	exportPage = 1024
	// exportChunk is how many cards a worker takes at once.
	exportChunk = 32
	// exportGroup is the most lines between two syncs of the file (and
	// the store's log of their cards, right after).
	exportGroup = 1024
	// exportSyncWait is the longest a written line waits for its sync.
	exportSyncWait = time.Second
)

// Exporter hands the keys of a selection of cards to the receiving system
// that holds the KTK.
type Exporter struct {
	Store Store
	Token *hsm.Token
	// KEK is the KEK the cards' blobs are under (a card under another
	// KEK stops the export), KTK the receiver's key-transport key
	// (FindKTK).
	KEK *hsm.KEKRef
	KTK *hsm.KTKRef
	// Workers is the number of token sessions used in parallel (at
	// least 1; the Token should have as many).
	Workers int
	// Operator is who runs the export, for the store's log (required).
	Operator string
	// SyncEvery is the most lines between two syncs of the partial file
	// (0: 1024). Each sync is followed by one store transaction logging
	// those lines' cards.
	SyncEvery int
	// Progress, if set, is called after each sync.
	Progress func(ExportProgress)

	// page, groupWait and recycle replace exportPage, exportSyncWait
	// and the recycling period (hsm.NewRecycler; tests); afterRecord, if set, runs
	// after each line is added (tests: it slows the export down).
	page        int
	groupWait   time.Duration
	recycle     int64
	afterRecord func(n int)
}

// Export writes the cards of sel to the export file out (and its
// manifest beside it), or finishes an interrupted export to out with the
// same arguments. It refuses, before any token work: an untrusted KTK on
// a token that enforces CKA_WRAP_WITH_TRUSTED, a selection that matches
// no card (an unknown batch, or an Id of the list not in the store, is
// ErrNotFound), an existing out, and a partial file that is not this
// store's unfinished export to out with the same arguments. An error
// during the run keeps the partial file: rerun to continue.
func (e *Exporter) Export(ctx context.Context, sel ExportSelection, out string) (ExportResult, error) {
	start := time.Now()
	var res ExportResult
	if e.Store == nil || e.Token == nil || e.KEK == nil || e.KTK == nil {
		return res, errors.New("export: the store, the token, the KEK and the KTK are all required")
	}
	if err := sel.check(); err != nil {
		return res, err
	}
	if e.Operator == "" {
		return res, errors.New("export: say who runs the export (--operator NAME; $USER is not set): it is logged with the export")
	}
	if e.KTK.Label == e.KEK.Label {
		return res, fmt.Errorf("export: %q is given as both the KEK and the KTK", e.KEK.Label)
	}
	if m := e.Token.Mechanisms(); m != nil && m.EnforcesWrapWithTrusted && !e.KTK.Trusted {
		return res, fmt.Errorf("export: the KTK %q is not CKA_TRUSTED, and token %q enforces CKA_WRAP_WITH_TRUSTED: "+
			"K_I can leave the token only under a key the security officer marked trusted; import the receiver's KTK "+
			"by the key ceremony, with the SO", e.KTK.Label, e.Token.Info().Label)
	}
	if out == "" {
		return res, errors.New("export: no output file (--out FILE)")
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return res, fmt.Errorf("export: %w", err)
	}
	res.File = abs
	total, err := e.count(ctx, sel)
	if err != nil {
		return res, err
	}
	if total == 0 {
		return res, fmt.Errorf("export: the selection (%s) matches no card in this store: nothing to export", sel)
	}

	row := ExportLog{Operator: e.Operator, Issuer: e.Token.Info().Label, KEK: e.KEK.Label, KTK: e.KTK.Label,
		KTKCheckValue: e.KTK.CheckValue, Selection: sel.String(), File: abs, Status: ExportRunning}
	run, err := e.resumeRow(ctx, row)
	if err != nil {
		return res, err
	}
	res.ID = run.ID
	man := export.Manifest{KTK: export.KTK{Label: e.KTK.Label, CheckValue: e.KTK.CheckValue}, Issuer: row.Issuer, Select: row.Selection}
	if _, err := os.Lstat(abs); err == nil {
		// The last run died after the file was whole: with its manifest,
		// between the manifest and the store's record of it; without,
		// between the rename and the manifest.
		if _, err := os.Lstat(export.ManifestPath(abs)); err == nil {
			m, err := export.Read(export.ManifestPath(abs), func(int, export.Record, error) error { return nil })
			if err != nil {
				return res, fmt.Errorf("export: %s and its manifest are from an interrupted run, but do not agree: %w", abs, err)
			}
			if err := e.Store.FinishExport(ctx, run.ID, m.Count, m.SHA256); err != nil {
				return res, err
			}
			res.Manifest, res.Resumed, res.Seconds = m, m.Count, time.Since(start).Seconds()
			return res, nil
		}
		if err := os.Rename(abs, export.PartialPath(abs)); err != nil {
			return res, fmt.Errorf("export: %w", err)
		}
	}

	w, err := e.resume(ctx, run.ID, abs, man)
	if err != nil {
		return res, err
	}
	res.Resumed, res.TornBytes = w.Resumed(), w.Torn()
	x := &exportRun{e: e, st: e.Store, id: run.ID, path: abs, w: w, total: total, start: start, rec: hsm.NewRecycler(e.Token, e.recycle)}
	err = x.run(ctx, sel)
	res.Written = w.Count() - res.Resumed
	if err != nil {
		w.Abort()
		res.Seconds = time.Since(start).Seconds()
		return res, fmt.Errorf("export to %s: %w\n(%d cards are written in %s; run the same command again to continue after them)",
			abs, err, w.Count(), export.PartialPath(abs))
	}
	m, err := w.Close(time.Now())
	if err != nil {
		return res, fmt.Errorf("export to %s: %w", abs, err)
	}
	if err := e.Store.FinishExport(ctx, run.ID, m.Count, m.SHA256); err != nil {
		return res, err
	}
	res.Manifest, res.Seconds = m, time.Since(start).Seconds()
	return res, nil
}

// count counts the selection's cards, checking that its batch and every
// Id of its list are stored.
func (e *Exporter) count(ctx context.Context, sel ExportSelection) (int, error) {
	if sel.Batch != "" {
		if _, err := e.Store.Batch(ctx, sel.Batch); err != nil {
			if errors.Is(err, ErrNotFound) {
				return 0, fmt.Errorf("export: %w in this store (issuer batches list shows the batches; is --db the right store?)", err)
			}
			return 0, err
		}
	}
	if sel.IDs == nil {
		return e.Store.CountCards(ctx, sel.Batch, sel.State)
	}
	var missing []string
	nMissing := 0
	for ids := sel.IDs; len(ids) > 0; {
		k := min(exportPage, len(ids))
		known, err := e.Store.KnownCards(ctx, ids[:k])
		if err != nil {
			return 0, err
		}
		for i, ok := range known {
			if !ok {
				if nMissing++; len(missing) < 10 {
					missing = append(missing, hex.EncodeToString(ids[i]))
				}
			}
		}
		ids = ids[k:]
	}
	if nMissing > 0 {
		more := ""
		if nMissing > len(missing) {
			more = fmt.Sprintf(" and %d more", nMissing-len(missing))
		}
		return 0, fmt.Errorf("export: %d Ids of %s are not in this store: %s%s: %w (correct the list, or is --db the right store?)",
			nMissing, sel.IDsFrom, strings.Join(missing, ", "), more, ErrNotFound)
	}
	return len(sel.IDs), nil
}

// resumeRow finds the store's unfinished export to row.File and checks it
// is the same export, or begins a new one.
func (e *Exporter) resumeRow(ctx context.Context, row ExportLog) (ExportLog, error) {
	abs := row.File
	exists := func(p string) bool { _, err := os.Lstat(p); return err == nil }
	partial, file, man := exists(export.PartialPath(abs)), exists(abs), exists(export.ManifestPath(abs))
	run, found, err := e.Store.RunningExport(ctx, abs)
	if err != nil {
		return run, err
	}
	if found && !sameExport(run, row) {
		if partial || file || man {
			p := export.PartialPath(abs)
			if !partial {
				p = abs
			}
			return run, fmt.Errorf("export: %s is an unfinished export of %s under KTK %q (KEK %q, token %q), started %s by %s: "+
				"run the command again with those arguments to finish it, or remove %s to abandon it",
				p, run.Selection, run.KTK, run.KEK, run.Issuer, run.Started.Format(time.RFC3339), run.Operator, p)
		}
		// Its files are gone: abandoned.
		if err := e.Store.AbandonExport(ctx, run.ID); err != nil {
			return run, err
		}
		found = false
	}
	if found {
		return run, nil
	}
	for _, p := range []string{abs, export.ManifestPath(abs)} {
		if exists(p) {
			return run, fmt.Errorf("export: %s exists: an export is never overwritten (choose another --out)", p)
		}
	}
	if partial {
		return run, fmt.Errorf("export: %s exists, but this store has no unfinished export to %s: it was begun against another store (--db), "+
			"or abandoned; remove it to start again", export.PartialPath(abs), abs)
	}
	id := make([]byte, 16)
	rand.Read(id)
	row.ID, row.Started = hex.EncodeToString(id), time.Now()
	if err := e.Store.BeginExport(ctx, row); err != nil {
		return row, err
	}
	return row, nil
}

func sameExport(a, b ExportLog) bool {
	return a.Issuer == b.Issuer && a.KEK == b.KEK && a.KTK == b.KTK && bytes.Equal(a.KTKCheckValue, b.KTKCheckValue) &&
		a.Selection == b.Selection && a.File == b.File
}

// resume opens the partial file and brings the store's log of the export
// in line with it: the cards of complete lines the store did not log yet
// are logged, those it logged past the file's end forgotten.
func (e *Exporter) resume(ctx context.Context, id, abs string, man export.Manifest) (*export.Writer, error) {
	logged, err := e.Store.LastExported(ctx, id)
	if err != nil {
		return nil, err
	}
	group := e.syncEvery()
	var pend [][]byte
	n := 0
	w, err := export.Resume(abs, man, func(r export.Record) error {
		n++
		if logged != nil && bytes.Compare(r.ID, logged) <= 0 {
			return nil
		}
		pend = append(pend, r.ID)
		if len(pend) < group {
			return nil
		}
		err := e.Store.LogExport(ctx, id, pend, n)
		pend = pend[:0:0]
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if err := e.Store.TrimExport(ctx, id, w.Last()); err != nil {
		w.Abort()
		return nil, err
	}
	if err := e.Store.LogExport(ctx, id, pend, w.Count()); err != nil {
		w.Abort()
		return nil, err
	}
	return w, nil
}

func (e *Exporter) syncEvery() int {
	if e.SyncEvery > 0 {
		return e.SyncEvery
	}
	return exportGroup
}

// exportRun is one run of the pipeline: reader, workers, writer.
type exportRun struct {
	e     *Exporter
	st    Store
	id    string
	path  string
	w     *export.Writer
	total int
	start time.Time
	rec   *hsm.Recycler // SoftHSM2's recycling, counted over the workers
}

// exportJob is a chunk of cards in the order they go into the file
// (seq), and after the token's work their exports.
type exportJob struct {
	seq   int
	cards []ExportCard
	out   []hsm.Export
}

func (x *exportRun) run(ctx context.Context, sel ExportSelection) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	e := x.e
	n := max(e.Workers, 1)
	kek := e.KEK.SessionCopy()
	defer kek.Destroy(context.WithoutCancel(ctx))

	jobs := make(chan exportJob, 2*n)
	done := make(chan exportJob, 2*n)
	// At most this many chunks between the reader and the writer: the
	// writer's reordering stays bounded whatever the workers' pace.
	inflight := make(chan struct{}, 4*n+2)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer close(jobs)
		seq := 0
		err := x.read(ctx, sel, x.w.Last(), func(cs []ExportCard) bool {
			for len(cs) > 0 {
				k := min(exportChunk, len(cs))
				select {
				case inflight <- struct{}{}:
				case <-ctx.Done():
					return false
				}
				select {
				case jobs <- exportJob{seq: seq, cards: cs[:k:k]}:
				case <-ctx.Done():
					return false
				}
				seq++
				cs = cs[k:]
			}
			return true
		})
		if err != nil {
			cancel(err)
		}
	}()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One OS thread for the worker's token calls, as the
			// importer's and the rotation's workers.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			for j := range jobs {
				if ctx.Err() != nil {
					continue // drain
				}
				j.out = make([]hsm.Export, len(j.cards))
				for i, c := range j.cards {
					var err error
					if j.out[i], err = x.exportOne(ctx, kek, c); err != nil {
						cancel(err)
						break
					}
				}
				if ctx.Err() != nil {
					continue
				}
				select {
				case done <- j:
				case <-ctx.Done():
				}
			}
		}()
	}
	go func() {
		wg.Wait()
		close(done)
	}()
	if err := x.write(ctx, done, inflight); err != nil {
		cancel(err)
	}
	// Nothing of this run goes on after it: the workers' token calls
	// (the KEK's session copy is destroyed next) and the reader's query.
	for range done {
	}
	<-readerDone
	if err := context.Cause(ctx); err != nil && ctx.Err() != nil {
		return err
	}
	return nil
}

// read hands the selection's cards after after, in Id order, to emit in
// pages, until emit returns false or there are no more.
func (x *exportRun) read(ctx context.Context, sel ExportSelection, after []byte, emit func([]ExportCard) bool) error {
	page := x.e.page
	if page <= 0 {
		page = exportPage
	}
	if sel.IDs != nil {
		ids := sel.IDs[sort.Search(len(sel.IDs), func(i int) bool { return bytes.Compare(sel.IDs[i], after) > 0 }):]
		for len(ids) > 0 {
			k := min(page, len(ids))
			cs, err := x.st.CardsByID(ctx, ids[:k])
			if err != nil {
				return err
			}
			if len(cs) != k {
				return fmt.Errorf("%d of the %d cards of the list from %x on are no longer in the store", k-len(cs), k, ids[0])
			}
			if !emit(cs) {
				return nil
			}
			ids = ids[k:]
		}
		return nil
	}
	for {
		cs, err := x.st.SelectCards(ctx, sel.Batch, sel.State, after, page)
		if err != nil {
			return err
		}
		if len(cs) == 0 {
			return nil
		}
		after = cs[len(cs)-1].ID
		if !emit(cs) {
			return nil
		}
	}
}

// exportOne has the token move one card's K_I from the KEK to the KTK.
func (x *exportRun) exportOne(ctx context.Context, kek *hsm.SessionCopy, c ExportCard) (hsm.Export, error) {
	e := x.e
	if c.Blob.KEK != e.KEK.Label {
		return hsm.Export{}, fmt.Errorf("card %x: its key is wrapped under KEK %q, not %q: finish the KEK rotation first, or give --kek %s",
			[]byte(c.ID), c.Blob.KEK, e.KEK.Label, c.Blob.KEK)
	}
	var out hsm.Export
	err := e.Token.With(ctx, func(s hsm.Session) error {
		kh, err := kek.Handle(s)
		if err != nil {
			return err
		}
		th, err := e.KTK.Handle(s)
		if err != nil {
			return err
		}
		out, err = hsm.ExportCardKey(s, kh, th, c.Blob)
		return err
	})
	if err != nil {
		return hsm.Export{}, fmt.Errorf("card %x: %w", []byte(c.ID), err)
	}
	x.rec.Count()
	return out, nil
}

// write puts the workers' chunks into the file in their order, syncs it
// every group of lines (or exportSyncWait), and after each sync logs
// that group's cards in the store.
func (x *exportRun) write(ctx context.Context, done <-chan exportJob, inflight <-chan struct{}) error {
	e := x.e
	group := e.syncEvery()
	wait := e.groupWait
	if wait <= 0 {
		wait = exportSyncWait
	}
	var ids [][]byte
	lastSync := time.Now()
	resumed := x.w.Count()
	flush := func() error {
		if err := x.w.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", export.PartialPath(x.path), err)
		}
		if len(ids) > 0 {
			if err := x.st.LogExport(ctx, x.id, ids, x.w.Count()); err != nil {
				return err
			}
		}
		ids, lastSync = ids[:0], time.Now()
		if e.Progress != nil {
			e.Progress(ExportProgress{Total: x.total, Done: x.w.Count(), Resumed: resumed, Elapsed: time.Since(x.start)})
		}
		return nil
	}
	pending := map[int]exportJob{}
	next := 0
	for j := range done {
		if ctx.Err() != nil {
			continue // drain
		}
		pending[j.seq] = j
		for {
			j, ok := pending[next]
			if !ok {
				break
			}
			delete(pending, next)
			next++
			<-inflight
			for i, c := range j.cards {
				r := export.Record{ID: c.ID, Profile: c.Profile, Wrapped: j.out[i].Wrapped, KCV: j.out[i].CheckValue}
				if err := x.w.Add(r); err != nil {
					return err
				}
				ids = append(ids, c.ID)
				if e.afterRecord != nil {
					e.afterRecord(x.w.Count())
				}
				if len(ids) >= group {
					if err := flush(); err != nil {
						return err
					}
				}
			}
		}
		if len(ids) > 0 && time.Since(lastSync) >= wait {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	return flush()
}
