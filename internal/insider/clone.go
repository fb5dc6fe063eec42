package insider

// The second insider attack: record replacement and injection with an
// emulated clone (docs/PROTOCOL.md §10, "What it closes"). Unlike Fig. 2,
// it leaves the issuer key alone. The insider makes a card of her own with
// the Id of a genuine card (or an Id no card carries), personalizes it
// under the GENUINE issuer key PK with randomness she draws, and swaps its
// record (Id, c*) into the batch in place of the genuine card's (Id, c):
// c* = E_PK(r*), so the issuer's token derives K* = KDF(r*, B(PK)), which
// her clone holds. Theorem 3 protects the genuine card's key, not the
// issuer's acceptance of c: without chip attestation (§10) the issuer
// cannot tell c* from the c a genuine chip made, and the clone
// authenticates while the genuine card fails.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/internal/atomicfile"
	"blindperso/protocol"
)

// CloneOptions are the insider's choices for Clone.
type CloneOptions struct {
	// Inject adds a record for an Id that is not in the batch (no genuine
	// card carries it) instead of replacing an existing one. Clone refuses
	// an Id that is in the batch when Inject is set, and one that is not
	// when it is not: the insider says which attack she means.
	Inject bool
	// KeepAttestation copies the replaced record's "attestation" member
	// (a version-2 batch, docs/BATCH.md) unchanged into the forged record.
	// The insider cannot sign for c* with a genuine chip's key, so the kept
	// statement names SHA-256 of the genuine c, not of c*. Default: the
	// member is dropped and the forged record is unattested.
	KeepAttestation bool
	// Rand is the insider's randomness: the clone draws r* from it
	// (card.Applet.SetRand). nil means crypto/rand. Whoever knows what it
	// produced knows r* and so K*; a test uses it to show exactly that.
	Rand io.Reader
	// Now stamps an injected record; nil means time.Now. A replaced record
	// keeps the genuine record's time and reader.
	Now func() time.Time
	// Log gets one line per forgery (card Id, line, what was done with the
	// attestation), never r*, S or K*. nil discards.
	Log *slog.Logger
}

// CloneResult says what Clone did.
type CloneResult struct {
	// Original is the genuine card's record that was replaced; nil when
	// the record was injected.
	Original *batch.Record
	// Forged is the record now in the batch: the Id, c* = E_PK(r*), the
	// genuine key's fingerprint.
	Forged batch.Record
	// Line is the forged record's line in the batch (from 1).
	Line int
	// Manifest is the resealed manifest: the original one with count,
	// bytes and sha256 recomputed for the forged batch.
	Manifest batch.Manifest
	// Card is the clone: a locked virtual card with the record's Id and
	// K*. Its state file (CardPath) holds K*: it is the insider's loot.
	Card     *card.Applet
	CardPath string
	// Attestation is what became of the original record's attestation:
	// AttestationNone, AttestationDropped or AttestationKept.
	Attestation string
	// Upgraded: a version-1 batch was rewritten as version 2
	// (ReplaceResult.Upgraded).
	Upgraded bool
}

// What CloneResult.Attestation says.
const (
	AttestationNone    = "none"    // the original record had none (or the record was injected)
	AttestationDropped = "dropped" // the forged record is unattested
	AttestationKept    = "kept"    // copied unchanged: it signs SHA-256 of the genuine c, not of c*
)

// Clone runs the record replacement attack on the sealed batch at
// batchPath (with its manifest beside it), for the card with Id id under
// the genuine issuer key genuine:
//
//  1. the batch must verify against its manifest (batch.Verify), and the
//     manifest must name genuine's fingerprint and a profile the key fits;
//  2. Emulate makes the clone at cardPath (which must not exist): a
//     virtual card with that Id, personalized under genuine with r* from
//     o.Rand, locked;
//  3. Replace puts the forged record, c*, in the Id's line (or appends it,
//     o.Inject) and reseals the manifest.
//
// If step 3 fails the clone is removed, and the batch is as it was unless
// the manifest could not be written after the forged batch was (the error
// says so).
func Clone(batchPath string, genuine *protocol.IssuerKey, id []byte, cardPath string, o CloneOptions) (CloneResult, error) {
	var res CloneResult
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(id) == 0 || len(id) > protocol.MaxIDLen {
		return res, fmt.Errorf("card id of %d bytes, want 1 to %d", len(id), protocol.MaxIDLen)
	}
	hid := hex.EncodeToString(id)
	var orig, last *batch.Record
	m, err := batch.Verify(batchPath, func(_ int, r batch.Record) error {
		r2 := r
		if bytes.Equal(r.ID, id) {
			orig = &r2
		}
		last = &r2
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("batch does not verify against its manifest (the insider forges sealed batches): %w", err)
	}
	if fp := genuine.Fingerprint(); !bytes.Equal(m.IssuerFingerprint, fp[:]) {
		return res, fmt.Errorf("batch is for issuer key %x, not the given issuer key %x", []byte(m.IssuerFingerprint), fp)
	}
	p, err := protocol.ProfileByName(m.Profile)
	if err != nil {
		return res, fmt.Errorf("manifest: %w", err)
	}
	if err := genuine.Fits(p); err != nil {
		return res, fmt.Errorf("issuer key: %w", err)
	}
	switch {
	case o.Inject && orig != nil:
		return res, fmt.Errorf("card %s is in the batch: injecting would repeat its Id (without --inject its record is replaced)", hid)
	case !o.Inject && orig == nil:
		return res, fmt.Errorf("card %s is not in the batch (--inject adds a record for an Id no genuine card carries)", hid)
	case o.Inject && o.KeepAttestation:
		return res, errors.New("--keep-attestation copies the replaced record's attestation; an injected record has none to copy")
	}

	a, c, err := Emulate(cardPath, id, p, genuine, o.Rand)
	if err != nil {
		return res, err
	}

	var rec batch.Record
	res.Attestation = AttestationNone
	if orig != nil {
		rec = *orig
		res.Original = orig
		if orig.Attestation != nil {
			if o.KeepAttestation {
				res.Attestation = AttestationKept
			} else {
				rec.Attestation = nil
				res.Attestation = AttestationDropped
			}
		}
	} else {
		now := time.Now
		if o.Now != nil {
			now = o.Now
		}
		fp := genuine.Fingerprint()
		rec = batch.Record{V: batch.Version, ID: bytes.Clone(id), Profile: p.Name, Fingerprint: fp[:], Time: now().UTC()}
		if last != nil { // look like the lines beside it
			rec.Reader = last.Reader
		}
	}
	rec.C = c

	rr, err := Replace(batchPath, rec, o.Inject)
	if err != nil {
		os.Remove(cardPath)
		return res, err
	}
	res.Forged, res.Line, res.Manifest, res.Upgraded = rr.Forged, rr.Line, rr.Manifest, rr.Upgraded
	res.Card, res.CardPath = a, cardPath
	log.Warn("ATTACK: record forged with c* = E_PK(r*) for an emulated clone",
		"card", hid, "injected", o.Inject, "line", rr.Line, "attestation", res.Attestation, "clone", cardPath)
	return res, nil
}

// Emulate makes the insider's clone: a virtual card manufactured at path
// (which must not exist) with Id id and no attestation key, personalized
// through the normal command flow (SELECT, GET ID, PERSONALIZE under
// genuine, LOCK with SHA-256(c*)) while drawing r* from rnd (nil:
// crypto/rand). It returns the locked card and c* = E_PK(r*); the card's
// state file holds K* = KDF(r*, B(PK)), the key the issuer will derive
// from c*. Nothing of r*, S or K* leaves the card here.
func Emulate(path string, id []byte, p protocol.Profile, genuine *protocol.IssuerKey, rnd io.Reader) (*card.Applet, []byte, error) {
	if err := genuine.Fits(p); err != nil {
		return nil, nil, fmt.Errorf("issuer key: %w", err)
	}
	a, err := card.Manufacture(path, card.Options{ID: bytes.Clone(id)})
	if err != nil {
		return nil, nil, fmt.Errorf("clone: %w", err)
	}
	c, err := emulate(a, id, p, genuine, rnd)
	if err != nil {
		os.Remove(path)
		return nil, nil, fmt.Errorf("clone %s: %w", path, err)
	}
	return a, c, nil
}

func emulate(a *card.Applet, id []byte, p protocol.Profile, genuine *protocol.IssuerKey, rnd io.Reader) ([]byte, error) {
	if rnd != nil {
		a.SetRand(rnd)
	}
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		return nil, err
	}
	got, err := cl.ID()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(got, id) {
		return nil, fmt.Errorf("card answers Id %x, want %x", got, id)
	}
	c, err := cl.Personalize(p, genuine.SPKI)
	if err != nil {
		return nil, err
	}
	if err := protocol.ValidCiphertext(p, genuine, c); err != nil {
		return nil, fmt.Errorf("c* is not a ciphertext under the issuer key: %w", err)
	}
	if err := cl.Lock(c); err != nil {
		return nil, err
	}
	return c, nil
}

// ReplaceResult says what Replace did.
type ReplaceResult struct {
	Original *batch.Record // the record replaced; nil when appended
	Forged   batch.Record  // rec as read back from the forged batch
	Line     int           // its line, from 1
	Manifest batch.Manifest
	// Upgraded: the batch was of an older version than batch.MarshalRecord
	// writes (version 1) and was rewritten whole in the current one.
	Upgraded bool
}

// Replace writes rec into the sealed batch at path, as an insider with
// write access to the station's files would: the line of rec's Id is
// replaced by batch.MarshalRecord(rec) (inject false; the Id must be in
// the batch) or rec is appended (inject true; it must not be). Every other
// line is kept byte for byte (but for a version-1 batch, see
// ReplaceResult.Upgraded). Then the manifest is resealed: the original
// manifest with only count, bytes and sha256 recomputed (batch.Summarize),
// so that the batch matches its manifest again and nothing else in it
// changes. Both files are replaced atomically (batch first), keeping their
// modes, and the result is checked with batch.Verify. rec must be of the
// manifest's profile and issuer key.
func Replace(path string, rec batch.Record, inject bool) (ReplaceResult, error) {
	var res ReplaceResult
	data, err := os.ReadFile(path)
	if err != nil {
		return res, err
	}
	m, err := batch.Verify(path, nil)
	if err != nil {
		return res, fmt.Errorf("batch does not verify against its manifest: %w", err)
	}
	if sum := sha256.Sum256(data); !bytes.Equal(sum[:], m.SHA256) {
		return res, fmt.Errorf("batch %s changed while it was read", path)
	}
	if rec.Profile != m.Profile {
		return res, fmt.Errorf("forged record of profile %q, batch of %q", rec.Profile, m.Profile)
	}
	if !bytes.Equal(rec.Fingerprint, m.IssuerFingerprint) {
		return res, fmt.Errorf("forged record for issuer key %x, batch for %x", []byte(rec.Fingerprint), []byte(m.IssuerFingerprint))
	}
	line, err := batch.MarshalRecord(rec)
	if err != nil {
		return res, fmt.Errorf("forged record: %w", err)
	}
	forged, err := batch.ParseRecord(line[:len(line)-1])
	if err != nil {
		return res, fmt.Errorf("forged record would not parse back: %w", err)
	}

	// The batch verified: every line is a record ending in '\n'.
	lines := bytes.SplitAfter(data, []byte{'\n'})
	if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
		lines = lines[:len(lines)-1]
	}
	// batch.MarshalRecord writes the current version only: a batch of an
	// older one (version 1) is rewritten whole in the current version, the
	// same records, under a manifest of the current format.
	upgrade := m.Version() != batch.Version
	at := -1
	for i, l := range lines {
		r, err := batch.ParseRecord(l[:len(l)-1])
		if err != nil {
			return res, fmt.Errorf("batch %s line %d: %w", path, i+1, err)
		}
		if bytes.Equal(r.ID, rec.ID) {
			at = i
			res.Original = &r
		}
		if upgrade {
			if lines[i], err = batch.MarshalRecord(r); err != nil {
				return res, fmt.Errorf("batch %s line %d: %w", path, i+1, err)
			}
		}
	}
	id := hex.EncodeToString(rec.ID)
	switch {
	case inject && at >= 0:
		return res, fmt.Errorf("card %s is already in the batch (line %d)", id, at+1)
	case !inject && at < 0:
		return res, fmt.Errorf("card %s is not in the batch", id)
	case inject:
		lines = append(lines, line)
		at = len(lines) - 1
	default:
		lines[at] = line
	}
	out := bytes.Join(lines, nil)

	s, err := batch.Summarize(bytes.NewReader(out))
	if err != nil {
		return res, err
	}
	m2 := m
	m2.Count, m2.Bytes, m2.SHA256 = s.Lines, s.Bytes, s.SHA256
	if upgrade {
		m2.Format = batch.FormatOf(batch.Version)
		res.Upgraded = true
	}
	mb, err := batch.MarshalManifest(m2)
	if err != nil {
		return res, fmt.Errorf("manifest: %w", err)
	}
	if err := writeKeepMode(path, out); err != nil {
		return res, fmt.Errorf("write forged batch: %w", err)
	}
	if err := writeKeepMode(batch.ManifestPath(path), mb); err != nil {
		return res, fmt.Errorf("write resealed manifest (the batch is already forged and no longer matches it): %w", err)
	}
	if m2, err = batch.Verify(path, nil); err != nil {
		return res, fmt.Errorf("forged batch does not verify against the resealed manifest: %w", err)
	}
	res.Forged, res.Line, res.Manifest = forged, at+1, m2
	return res, nil
}

// writeKeepMode replaces path atomically and gives the new file the old
// one's permissions (atomicfile creates 0600).
func writeKeepMode(path string, data []byte) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, data); err != nil {
		return err
	}
	if err := os.Chmod(path, fi.Mode().Perm()); err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return nil
}
