-- revoke.lua: delete one session and drop it from its owner's index.
-- KEYS[1]  session key
-- ARGV[1]  session id
-- ARGV[2]  key base '<prefix>:{<tag>}:' (the index shares the slot)
-- ARGV[3]  required owner (encoded user id), or '' to accept any owner
-- Reply:   0 if there was no live session (or it is another user's) | the record deleted
-- rotate uses the record to carry an anonymous session over to a user's slot.

local key = KEYS[1]
local v = redis.call('GET', key)
if not v then return 0 end
local owner = owner_of(v)
if ARGV[3] ~= '' and owner ~= ARGV[3] then return 0 end
local pttl = redis.call('PTTL', key)
redis.call('DEL', key)
if owner ~= '' then
  redis.call('ZREM', ARGV[2] .. INDEX_PART .. owner, ARGV[1])
end
return {v, pttl}
