-- chat_append.lua: append one message to a chat history, trimmed and expiring.
-- KEYS[1]  chat list            KEYS[2]  the user's chat-room set
-- KEYS[3]  the user's session index (read only when ARGV[5] is '1')
-- ARGV[1]  message (JSON)       ARGV[2]  max messages kept
-- ARGV[3]  ttl, ms              ARGV[4]  room id, encoded
-- ARGV[5]  '1' if chats are owned by sessions: refuse unless the user has a live session
-- ARGV[6]  key base '<prefix>:{<tag>}:'
-- ARGV[7]  max chat rooms per user
-- ARGV[8]  user id, encoded
-- Reply:   new length | -1 when ARGV[5] is '1' and the user has no live session
--          | -2 when the room is new and the user has ARGV[7] rooms already
-- Every refusal comes before the first write that keeps anything (pruning dead index
-- entries and rooms is the only work done on the way), and every loop is bounded by a
-- setting: sessions per user, rooms per user.

if ARGV[5] == '1' then
  local idx = KEYS[3]
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
  local live = false
  for _, sid in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
    if redis.call('EXISTS', ARGV[6] .. SESSION_PART .. sid) == 1 then
      live = true
      break
    end
  end
  if not live then return -1 end
end
local rooms = KEYS[2]
if redis.call('SISMEMBER', rooms, ARGV[4]) == 0 then
  local max_rooms = tonumber(ARGV[7])
  if redis.call('SCARD', rooms) >= max_rooms then
    -- Rooms whose history expired stay in the set until pruned here.
    local head = ARGV[6] .. CHAT_PART .. ARGV[8] .. ':'
    for _, room in ipairs(redis.call('SMEMBERS', rooms)) do
      if redis.call('EXISTS', head .. room) == 0 then
        redis.call('SREM', rooms, room)
      end
    end
    if redis.call('SCARD', rooms) >= max_rooms then return -2 end
  end
end
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
local max = tonumber(ARGV[2])
if n > max then
  redis.call('LTRIM', KEYS[1], -max, -1)
  n = max
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', rooms, ARGV[4])
redis.call('PEXPIRE', rooms, ARGV[3])
return n
