package cardtest

import (
	"crypto/sha256"
	"fmt"
	"time"

	"blindperso/batch"
	"blindperso/card"
	"blindperso/protocol"
)

// Personalize runs a blank in-process card through the station's one-card
// flow (SELECT, GET ID, PERSONALIZE, LOCK) under key and returns the
// record a station would write, without the station (so that the
// issuer's tests need no PC/SC stack).
func Personalize(a *card.Applet, p protocol.Profile, key *protocol.IssuerKey, reader string) (batch.Record, error) {
	if err := key.Fits(p); err != nil {
		return batch.Record{}, err
	}
	c := &card.Client{T: a.Local()}
	if err := c.Select(); err != nil {
		return batch.Record{}, err
	}
	id, err := c.ID()
	if err != nil {
		return batch.Record{}, err
	}
	ct, err := c.Personalize(p, key.SPKI)
	if err != nil {
		return batch.Record{}, fmt.Errorf("card %x: %w", id, err)
	}
	if err := protocol.ValidCiphertext(p, key, ct); err != nil {
		return batch.Record{}, fmt.Errorf("card %x: %w", id, err)
	}
	fp := key.Fingerprint()
	rec := batch.Record{V: batch.Version, ID: id, C: ct, Profile: p.Name, Fingerprint: fp[:], Reader: reader, Time: time.Now().UTC()}
	if rec.Attestation, err = readAttestation(c, fp[:], ct); err != nil {
		return rec, fmt.Errorf("card %x: %w", id, err)
	}
	if err := c.Lock(ct); err != nil {
		return rec, fmt.Errorf("card %x: %w", id, err)
	}
	return rec, nil
}

// readAttestation is what the station journals of an attested card
// (PROTOCOL.md §10.3), nil for a card without an attestation key.
func readAttestation(c *card.Client, fp, ct []byte) (*batch.Attestation, error) {
	st, err := c.Status()
	if err != nil || !st.Attested {
		return nil, err
	}
	chain, err := c.AttestationChain()
	if err != nil {
		return nil, err
	}
	sig, err := c.ReadAttestation()
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(ct)
	a := &batch.Attestation{Fingerprint: fp, CSHA256: h[:], Sig: sig}
	for _, der := range chain {
		a.Chain = append(a.Chain, der)
	}
	return a, nil
}
