package protocol

import (
	"crypto/aes"
	"errors"
	"fmt"

	"github.com/aead/cmac"
)

// AuthLabel opens the message a card MACs in AUTHENTICATE.
const AuthLabel = "blindperso auth v1"

// Sizes of the authentication exchange.
const (
	ChallengeLen = 16
	MACLen       = 16
	MaxIDLen     = 16
)

// AuthMessage is the message MACed in AUTHENTICATE:
//
//	M = AuthLabel ‖ u8(len(Id)) ‖ Id ‖ challenge
//
// The Id is in it so that a MAC from one card cannot answer a challenge
// issued for another.
func AuthMessage(id, challenge []byte) ([]byte, error) {
	if len(id) == 0 || len(id) > MaxIDLen {
		return nil, fmt.Errorf("card id is %d bytes, want 1 to %d", len(id), MaxIDLen)
	}
	if len(challenge) != ChallengeLen {
		return nil, fmt.Errorf("challenge is %d bytes, want %d", len(challenge), ChallengeLen)
	}
	m := make([]byte, 0, len(AuthLabel)+1+len(id)+len(challenge))
	m = append(m, AuthLabel...)
	m = append(m, byte(len(id)))
	m = append(m, id...)
	return append(m, challenge...), nil
}

// AuthMAC is the card's answer to a challenge: AES-CMAC under K_I over
// AuthMessage, all 16 bytes. The issuer verifies it in-token (C_Verify).
func AuthMAC(ki, id, challenge []byte) ([]byte, error) {
	if len(ki) != KeySize {
		return nil, errors.New("K_I must be 16 bytes")
	}
	m, err := AuthMessage(id, challenge)
	if err != nil {
		return nil, err
	}
	blk, err := aes.NewCipher(ki)
	if err != nil {
		return nil, err
	}
	return cmac.Sum(m, blk, MACLen)
}
