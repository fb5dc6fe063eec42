// Package issuer is the issuer's side of a personalization run: it takes
// the perso station's records, has the token derive and wrap each card's
// K_I, and verifies cards' answers to challenges in the token. Only
// wrapped blobs and public data pass through it.
package issuer

import (
	"bytes"
	"context"
	"fmt"
	"sync"

	"blindperso/batch"
	"blindperso/hsm"
	"blindperso/protocol"
)

// CardKey is what the issuer stores per card: public data and K_I wrapped
// under the KEK. The blob records the wrap scheme, the token's mechanism
// code and the KEK's label, so it can be unwrapped later by the right key
// with the right mechanism.
type CardKey struct {
	ID                protocol.Hex `json:"id"`
	Profile           string       `json:"profile"`
	IssuerFingerprint protocol.Hex `json:"issuer_fingerprint"`
	Blob              hsm.Blob     `json:"blob"`
}

// Issuer binds a token to the issuer key the cards were personalized
// under and to the KEK that protects stored card keys. The token work —
// session copies where the token makes them, SoftHSM2's recycling, and
// the failover between several tokens that hold the same keys — is
// hsm.Group's; Issuer adds what the issuer checks of a record.
type Issuer struct {
	// Token, Key and KEK are the token and keys of a lone token, or the
	// first member of Group.
	Token *hsm.Token
	Key   *hsm.IssuerKeyRef
	KEK   *hsm.KEKRef
	// Group, if set, does the token work over its members (made by
	// hsm.NewGroup, which proved they hold the same keys); else a group
	// of Token alone does it.
	Group *hsm.Group
	// TokenObjects, if set before first use, makes the issuer use the
	// token objects themselves, without session copies (a lone token).
	TokenObjects bool
	// RecycleEvery, if set before first use, replaces
	// hsm.DefaultRecycleEvery (tests; hsm.NeverRecycle turns it off; 0
	// leaves it to hsm.RecycleEnv or the default) for a lone token.
	// Imports and verifications count alike, so issuer serve, which may
	// only verify for months, recycles as the importer does.
	RecycleEvery int64

	once   sync.Once
	keys   *hsm.Group
	keyErr error
}

func (is *Issuer) cardKeys() (*hsm.Group, error) {
	is.once.Do(func() {
		if is.Group != nil {
			is.keys = is.Group
			return
		}
		// One member: NewGroup checks nothing and touches no token.
		is.keys, is.keyErr = hsm.NewGroup(context.Background(), []hsm.Member{{Token: is.Token, Key: is.Key, KEK: is.KEK}},
			hsm.GroupOptions{TokenObjects: is.TokenObjects, RecycleEvery: is.RecycleEvery})
	})
	return is.keys, is.keyErr
}

// Import derives one card's K_I from its record in the token and returns
// it wrapped. A record for another issuer key, an unknown profile, or a c
// the token refuses is an error naming the card.
func (is *Issuer) Import(ctx context.Context, rec batch.Record) (CardKey, error) {
	fp := is.Key.Fingerprint()
	if !bytes.Equal(rec.Fingerprint, fp[:]) {
		return CardKey{}, fmt.Errorf("card %x: personalized under issuer key %x, not this issuer's %x", []byte(rec.ID), []byte(rec.Fingerprint), fp)
	}
	p, err := protocol.ProfileByName(rec.Profile)
	if err != nil {
		return CardKey{}, fmt.Errorf("card %x: %w", []byte(rec.ID), err)
	}
	g, err := is.cardKeys()
	if err != nil {
		return CardKey{}, err
	}
	blob, err := g.Import(ctx, p, rec.C)
	if err != nil {
		return CardKey{}, fmt.Errorf("import card %x: %w", []byte(rec.ID), err)
	}
	return CardKey{ID: rec.ID, Profile: p.Name, IssuerFingerprint: fp[:], Blob: blob}, nil
}

// Verify checks a card's MAC over challenge in the token. false means the
// card answered with another key: the paper's sign of an active attack
// during personalization (or a broken card).
func (is *Issuer) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	g, err := is.cardKeys()
	if err != nil {
		return false, err
	}
	ok, err := g.Verify(ctx, ck.Blob, ck.ID, challenge, mac)
	if err != nil {
		return false, fmt.Errorf("verify card %x: %w", []byte(ck.ID), err)
	}
	return ok, nil
}

// RecycleStats says how often the token was recycled for this Issuer's
// imports and verifications, and how long each recycle held them off.
// (summed over a group's members).
func (is *Issuer) RecycleStats() hsm.RecycleStats {
	g, err := is.cardKeys()
	if err != nil {
		return hsm.RecycleStats{}
	}
	return g.RecycleStats()
}

// Members says how each token of the issuer is (one for a lone token).
func (is *Issuer) Members() []hsm.MemberStats {
	g, err := is.cardKeys()
	if err != nil {
		return nil
	}
	return g.Stats()
}

// Failovers counts the token calls redone after a device failure (hsm.Group.Failovers).
func (is *Issuer) Failovers() int64 {
	g, err := is.cardKeys()
	if err != nil {
		return 0
	}
	return g.Failovers()
}

// Close stops a group's re-probing and destroys the session copies of
// the keys (the Tokens stay open: they are the caller's). The Issuer can
// still be used afterwards, with the token objects.
func (is *Issuer) Close(ctx context.Context) error {
	g, err := is.cardKeys()
	if err != nil {
		return err
	}
	return g.Close(ctx)
}
