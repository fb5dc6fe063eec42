// Package issuer is the issuer's side of a personalization run: it takes
// the perso station's records, has the token derive and wrap each card's
// K_I, and verifies cards' answers to challenges in the token. Only
// wrapped blobs and public data pass through it.
package issuer

import (
	"bytes"
	"context"
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/perso"
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
// under and to the KEK that protects stored card keys.
type Issuer struct {
	Token *hsm.Token
	Key   *hsm.IssuerKeyRef
	KEK   *hsm.KEKRef
}

// Import derives one card's K_I from its record in the token and returns
// it wrapped. A record for another issuer key, an unknown profile, or a c
// the token refuses is an error naming the card.
func (is *Issuer) Import(ctx context.Context, rec perso.Record) (CardKey, error) {
	fp := is.Key.Fingerprint()
	if !bytes.Equal(rec.Fingerprint, fp[:]) {
		return CardKey{}, fmt.Errorf("card %X: personalized under issuer key %x, not this issuer's %x", []byte(rec.ID), []byte(rec.Fingerprint), fp)
	}
	p, err := protocol.ProfileByName(rec.Profile)
	if err != nil {
		return CardKey{}, fmt.Errorf("card %X: %w", []byte(rec.ID), err)
	}
	var blob hsm.Blob
	err = is.Token.With(ctx, func(s hsm.Session) error {
		sk, kek, err := is.handles(s)
		if err != nil {
			return err
		}
		blob, err = hsm.ImportCard(s, p, sk, kek, is.Key.Public.SPKI, rec.C)
		return err
	})
	if err != nil {
		return CardKey{}, fmt.Errorf("import card %X: %w", []byte(rec.ID), err)
	}
	blob.KEK = is.KEK.Label
	return CardKey{ID: rec.ID, Profile: p.Name, IssuerFingerprint: fp[:], Blob: blob}, nil
}

// Verify checks a card's MAC over challenge in the token. false means the
// card answered with another key: the paper's sign of an active attack
// during personalization (or a broken card).
func (is *Issuer) Verify(ctx context.Context, ck CardKey, challenge, mac []byte) (bool, error) {
	if ck.Blob.KEK != is.KEK.Label {
		return false, fmt.Errorf("card %X: key wrapped under KEK %q, not %q", []byte(ck.ID), ck.Blob.KEK, is.KEK.Label)
	}
	var ok bool
	err := is.Token.With(ctx, func(s hsm.Session) error {
		kek, err := is.KEK.Handle(s)
		if err != nil {
			return err
		}
		ok, err = hsm.VerifyCardMAC(s, kek, ck.Blob, ck.ID, challenge, mac)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("verify card %X: %w", []byte(ck.ID), err)
	}
	return ok, nil
}

func (is *Issuer) handles(s hsm.Session) (sk, kek pkcs11.ObjectHandle, err error) {
	if sk, err = is.Key.Handle(s); err != nil {
		return 0, 0, err
	}
	kek, err = is.KEK.Handle(s)
	return sk, kek, err
}
